"""Errors of the external database I/O manager, as subclasses of the package's taxonomy.

Connection failures are :class:`~flowstone_dagster.errors.TransportError` (retryable) and
statement timeouts :class:`~flowstone_dagster.errors.CallTimeout` (retryable); everything the
database refuses is a :class:`DatabaseError` carrying the SQLSTATE::

    from flowstone_dagster.external_db.errors import ConstraintViolation

    try:
        db.store_table("orders", rows)
    except ConstraintViolation as exc:
        print(exc.sqlstate, exc.constraint, exc.row)   # 23505 orders_pkey 50001

No message carries the password: the adapters redact it from every driver message before an
exception is built, and the driver's own exception is never chained (``from None``), so that
Dagster's event log, which records the whole cause chain, cannot show it either.
"""

from __future__ import annotations

from flowstone_dagster.errors import RETRYABLE_SQLSTATES, ExternalServiceError

__all__ = ["ConstraintViolation", "DatabaseError", "InvalidValue", "SchemaMismatch"]


class DatabaseError(ExternalServiceError):
    """The database refused a statement (SQL error, missing table, bad value, permissions).

    ``sqlstate`` is the five-character SQLSTATE when the driver reports one (PostgreSQL; SQLite
    has none), ``table`` the table concerned when known. Not retryable, except transient
    conflicts (serialization failures, deadlocks, too many connections), which succeed when run
    again.
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        table: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.sqlstate = sqlstate
        self.table = table
        self.retryable = sqlstate in RETRYABLE_SQLSTATES


class ConstraintViolation(DatabaseError):
    """A row broke a constraint (unique, not null, check, foreign key). Never retried.

    The transaction was rolled back: the table is exactly as it was before the store.
    ``constraint`` names the constraint and ``row`` the 1-based position of the offending row in
    the data when the database says which (PostgreSQL's COPY does).
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        table: str | None = None,
        constraint: str | None = None,
        row: int | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, sqlstate=sqlstate, table=table, service=service)
        self.constraint = constraint
        self.row = row


class SchemaMismatch(DatabaseError, ValueError):
    """The data does not fit the existing table: a column the table lacks, or values of a type
    the column cannot hold. Detected before anything is written. Never retried.

    ``column`` names the column; ``expected`` is the table's type and ``found`` the data's.
    Fix the data, or migrate the table (the I/O manager never alters an existing table).
    """

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        column: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, table=table, service=service)
        self.column = column
        self.expected = expected
        self.found = found


class InvalidValue(DatabaseError, ValueError):
    """A value the database cannot hold (NUL in PostgreSQL text, NaN or infinity inside JSON, a
    lone surrogate in a string, an integer beyond 64 bits). Never retried: the same data fails
    the same way. The transaction was rolled back.

    ``column`` names the column and ``row`` the 1-based position of the row in the data.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        column: str | None = None,
        row: int | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, table=table, service=service)
        self.column = column
        self.row = row
