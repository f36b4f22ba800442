-- Paid revenue per customer: the end of the chain raw_orders -> stg_orders -> customer_revenue.
select
    c.customer_id,
    c.name,
    coalesce(sum(case when o.is_paid then o.amount end), 0) as revenue,
    count(o.order_id) as orders
from {{ ref('stg_customers') }} as c
left join {{ ref('stg_orders') }} as o using (customer_id)
group by 1, 2
