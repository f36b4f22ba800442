select count(*) as items, sum(qty) as qty from {{ ref('items') }}
