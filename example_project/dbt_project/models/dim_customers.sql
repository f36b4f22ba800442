-- One row per customer, with tenure used as a feature by the scoring model.
select
    customer_id,
    name,
    country,
    cast(signup_date as date) as signup_date,
    date_diff('day', cast(signup_date as date), date '2025-01-15') as tenure_days
from {{ ref('customers') }}
