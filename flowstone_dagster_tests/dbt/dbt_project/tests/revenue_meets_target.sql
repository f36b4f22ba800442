-- Deliberately failing data test: no customer reaches the target, so every row is a failure.
{{ config(tags=["deliberately_failing"]) }}
select customer_id, revenue, target
from {{ ref('revenue_targets') }}
where revenue < target
