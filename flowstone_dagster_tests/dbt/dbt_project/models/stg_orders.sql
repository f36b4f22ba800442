-- Orders as typed, paid-or-refunded rows: the first link of the chain.
select
    order_id,
    customer_id,
    cast(ordered_on as date) as ordered_on,
    amount,
    status = 'paid' as is_paid
from {{ ref('raw_orders') }}
