-- Each customer's revenue against a target no customer reaches: the model is healthy, its test
-- `revenue_meets_target` deliberately fails. Both run only when selected (tag:deliberately_failing).
{{ config(tags=["deliberately_failing"]) }}
select customer_id, revenue, 1000 as target
from {{ ref('customer_revenue') }}
