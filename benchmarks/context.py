"""What every variant is built from: the run's options, its directories, tools and servers."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from shell import MiB, run


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    root: Path
    staging: Path
    logs: Path
    python: Path
    swift: str
    cnf: Path
    env: dict[str, str]
    api_url: str = ""
    server_sid: int = 0
    scratch_sock: Path | None = None
    source_bytes: int = 0
    restore_available: bool = False
    restore_help: str = ""
    last_backup: dict[str, dict] = field(default_factory=dict)  # variant -> our --json output
    recipients_file: Path | None = None  # age recipients for the encrypted variant
    no_encryption_flag: bool = False  # our CLI has --no-encryption REASON
    incremental: str | None = "not run"  # None: the CLI has the incremental contract

    @property
    def segment_bytes(self) -> int:
        return (self.args.segment_mib or 64) * MiB

    def container(self, variant: str) -> str:
        return f"ucb-bench-{variant.replace('_', '-')}"

    def running_env(self) -> dict[str, str]:
        return dict(self.env, PREFECT_API_URL=self.api_url,
                    PREFECT_HOME=str(self.workdir / "prefect-client"))

    def ephemeral_env(self, home: Path | None = None) -> dict[str, str]:
        return dict(self.env, PREFECT_HOME=str(home or self.workdir / "prefect-ephemeral"),
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")

    def server_sessions(self) -> dict[int, str]:
        """The running Prefect server's session, whose CPU is reported as a server's."""
        return {self.server_sid: "prefect-server"} if self.server_sid else {}

    def restore_target(self, variant: str) -> Path:
        return self.workdir / "restore" / variant

    def clean_container(self, container: str) -> None:
        """Delete a container and its segments (outside the timing)."""
        # Both at once: each CLI call costs a Python start and a token.
        sw = shlex.quote(self.swift)
        run(f"{sw} delete {container} & {sw} delete {container}_segments & wait", env=self.env,
            check=False)
