-- Deliberately broken: the column does not exist. Runs only when selected by name or by
-- tag:deliberately_failing (see selectors.yml).
{{ config(tags=["deliberately_failing"]) }}
select no_such_column from {{ ref('stg_orders') }}
