-- One row per customer, with tenure used as a feature by the scoring model.
select
    customer_id,
    name,
    country,
    cast(signup_date as date) as signup_date,
    {{ dbt.datediff("cast(signup_date as date)", "cast('2025-01-15' as date)", "day") }} as tenure_days
from {{ ref('customers') }}
