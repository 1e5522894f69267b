"""Fixtures and markers for the launch integration tests."""

from slurm_cluster import slurm_cluster, slurm_two_nodes  # noqa: F401  (pytest fixtures)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slurm: needs a local Slurm (skips unless slurmctld is installed; "
        "LORAMOE_REQUIRE_SLURM=1 turns the skip into a failure)",
    )
