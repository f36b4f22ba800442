select id, qty from {{ ref('raw_items') }}
