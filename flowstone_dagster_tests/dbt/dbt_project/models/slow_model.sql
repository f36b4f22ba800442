-- Deliberately slow (minutes of CPU): for timeout tests. Runs only when selected.
{{ config(tags=["deliberately_slow"]) }}
select sum(a.range * b.range) as total
from range(100000000) as a, range(100000) as b
