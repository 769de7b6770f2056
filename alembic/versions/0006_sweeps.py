"""sweeps: searches over job parameters whose trials are jobs (jobs.sweep_id)

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision. Jobs queued before it belong to no sweep (``sweep_id`` null)."""
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("search", sa.JSON(), nullable=False),
        sa.Column("promote", sa.String(length=64), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index("ix_sweeps_created_at_id", "sweeps", ["created_at", "id"], unique=False)
    if op.get_bind().dialect.name == "sqlite":
        # Not batch mode: it would copy jobs into a new table and drop the old one, and with
        # foreign keys on, that drop cascades to every step, epoch and alias. SQLite adds a
        # nullable column with a (named) reference in place.
        op.execute(
            "ALTER TABLE jobs ADD COLUMN sweep_id VARCHAR(32) "
            "CONSTRAINT fk_jobs_sweep_id_sweeps REFERENCES sweeps (id)"
        )
    else:
        op.add_column("jobs", sa.Column("sweep_id", sa.String(length=32), nullable=True))
        op.create_foreign_key(
            op.f("fk_jobs_sweep_id_sweeps"), "jobs", "sweeps", ["sweep_id"], ["id"]
        )
    op.create_index(op.f("ix_jobs_sweep_id"), "jobs", ["sweep_id"], unique=False)


def downgrade() -> None:
    """Revert this revision (trials stay, as ordinary jobs; the sweeps go).

    On SQLite the column can only go with its reference by copying the table (batch mode),
    which env.py runs with foreign keys off, so that the old table's drop cascades to no step.
    """
    op.drop_index(op.f("ix_jobs_sweep_id"), table_name="jobs")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("jobs", schema=None) as batch_op:
            batch_op.drop_column("sweep_id")  # its reference goes with it
    else:
        op.drop_constraint(op.f("fk_jobs_sweep_id_sweeps"), "jobs", type_="foreignkey")
        op.drop_column("jobs", "sweep_id")
    op.drop_index("ix_sweeps_created_at_id", table_name="sweeps")
    op.drop_table("sweeps")
