select 1 as id, 'one' as name
