select
    product_id,
    name,
    category,
    cast(unit_price as decimal(10, 2)) as unit_price
from {{ ref('products') }}
