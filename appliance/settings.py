"""Settings, one dataclass per concern, each field read from an ``APPLIANCE_*`` variable.

Every field names its variable and carries a one-line help text in its metadata.
:func:`load_settings` reads them all, collects *every* problem and raises one
:class:`~appliance.errors.SettingsError` that names each offending variable and
the value it received, so an admin fixes a broken environment in one pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from appliance.errors import SettingsError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["auto", "json", "console"]


def _env(name: str, help: str, **limits: Any) -> dict[str, Any]:
    return {"env": name, "help": help, **limits}


@dataclass(frozen=True)
class HomeSettings:
    """Where the appliance keeps its state."""

    home: Path = field(
        default=Path("var"),
        metadata=_env("APPLIANCE_HOME", "State directory: database, encrypted blobs, keys, logs."),
    )

    model_import_dir: Path | None = field(
        default=None,
        metadata=_env("APPLIANCE_MODEL_IMPORT_DIR",
                      "Directory on the host that POST /v1/model_imports imports base models from (admins place "
                      "model folders or GGUF files there); empty means <home>/imports."),
    )

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def imports_dir(self) -> Path:
        return self.model_import_dir or self.home / "imports"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def admin_token_file(self) -> Path:
        return self.home / "admin.token"


@dataclass(frozen=True)
class DatabaseSettings:
    """Relational state: identity, jobs, audit log."""

    url: str = field(
        default="",
        metadata=_env(
            "APPLIANCE_DATABASE_URL",
            "SQLAlchemy URL; empty means SQLite at $APPLIANCE_HOME/appliance.db.",
        ),
    )
    echo: bool = field(default=False, metadata=_env("APPLIANCE_DATABASE_ECHO", "Log every SQL statement."))
    busy_timeout_ms: int = field(
        default=30_000,
        metadata=_env("APPLIANCE_DATABASE_BUSY_TIMEOUT_MS", "SQLite lock wait in ms.", minimum=0),
    )


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP listener."""

    host: str = field(default="127.0.0.1", metadata=_env("APPLIANCE_HOST", "Interface to bind."))
    port: int = field(
        default=8080,
        metadata=_env("APPLIANCE_PORT", "TCP port to bind.", minimum=1, maximum=65535),
    )
    max_request_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_env("APPLIANCE_MAX_REQUEST_BYTES", "Largest JSON request body accepted.", minimum=1024),
    )


@dataclass(frozen=True)
class KeySettings:
    """Key material."""

    key_file: Path | None = field(
        default=None,
        metadata=_env(
            "APPLIANCE_KEY_FILE",
            "Master key-encryption key (mode 0600); empty means $APPLIANCE_HOME/keys/master.key.",
        ),
    )


@dataclass(frozen=True)
class LogSettings:
    """Structured logs."""

    level: LogLevel = field(default="INFO", metadata=_env("APPLIANCE_LOG_LEVEL", "Least severe level logged."))
    format: LogFormat = field(default="auto", metadata=_env(
        "APPLIANCE_LOG_FORMAT", "auto (readable lines on a terminal, JSON otherwise), json or console. The log "
                                "file under APPLIANCE_HOME/logs is always JSON."))


@dataclass(frozen=True)
class AuthSettings:
    """Authentication hardening."""

    max_failures: int = field(
        default=10,
        metadata=_env(
            "APPLIANCE_AUTH_MAX_FAILURES",
            "Failed authentications of one key (an address, a token id, an account) before further failing "
            "attempts are held back with a growing back-off; valid tokens are never refused.",
            minimum=1,
        ),
    )
    failure_window_s: int = field(
        default=300,
        metadata=_env("APPLIANCE_AUTH_FAILURE_WINDOW_S", "A key's failures are forgotten this many seconds after its "
                                                         "last one.", minimum=1),
    )


@dataclass(frozen=True)
class IntakeSettings:
    """Uploads, scanning and policy."""

    max_upload_bytes: int = field(
        default=1024 * 1024 * 1024,
        metadata=_env("APPLIANCE_MAX_UPLOAD_BYTES", "Largest accepted upload, bytes.", minimum=1),
    )
    max_line_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=_env("APPLIANCE_MAX_LINE_BYTES", "Longest accepted JSONL line, bytes.", minimum=1024),
    )
    max_findings: int = field(
        default=100_000,
        metadata=_env("APPLIANCE_MAX_FINDINGS", "Findings kept per file for the report (counts stay exact).", minimum=1),
    )
    max_image_archive_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_env("APPLIANCE_MAX_IMAGE_ARCHIVE_BYTES", "Largest image zip accepted (held in memory).",
                      minimum=1024),
    )
    default_policy: Path | None = field(
        default=None,
        metadata=_env(
            "APPLIANCE_DEFAULT_POLICY", "Policy for projects without their own; empty means the shipped default.yaml."
        ),
    )
    keep_originals: bool = field(
        default=True,
        metadata=_env("APPLIANCE_KEEP_ORIGINALS",
                      "Keep each JSONL upload as received (encrypted, shredded with the file) so that its data "
                      "owners can review findings by value and re-scan it under a changed policy or glossary."),
    )


@dataclass(frozen=True)
class AuditSettings:
    """The audit log's signed checkpoints."""

    checkpoint_interval_s: int = field(
        default=3600,
        metadata=_env("APPLIANCE_AUDIT_CHECKPOINT_INTERVAL_S",
                      "Seconds between signed checkpoints of the audit log (0: only on demand).", minimum=0),
    )


@dataclass(frozen=True)
class RetentionSettings:
    """The sweeper enforcing the retention periods of project policies."""

    sweep_interval_s: int = field(
        default=3600,
        metadata=_env("APPLIANCE_RETENTION_SWEEP_S",
                      "Seconds between retention sweeps, the first at start-up "
                      "(0: only `appliance retention sweep`).", minimum=0),
    )


@dataclass(frozen=True)
class PortalSettings:
    """The web portal's sessions."""

    session_idle_minutes: int = field(
        default=30, metadata=_env("APPLIANCE_SESSION_IDLE_MINUTES", "Idle time after which a portal session ends.",
                                  minimum=1),
    )
    session_max_hours: int = field(
        default=12, metadata=_env("APPLIANCE_SESSION_MAX_HOURS", "Longest a portal session lives.", minimum=1),
    )
    cookie_secure: bool = field(
        default=True,
        metadata=_env("APPLIANCE_COOKIE_SECURE", "Mark cookies Secure (HTTPS only; browsers exempt localhost)."),
    )


@dataclass(frozen=True)
class ServingSettings:
    """Model serving."""

    engine: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata=_env("APPLIANCE_SERVING_ENGINE", "transformers (embedded) or vllm (a vLLM OpenAI server)."),
    )
    vllm_url: str = field(
        default="http://127.0.0.1:8000",
        metadata=_env("APPLIANCE_VLLM_URL",
                      "Base URL of the vLLM server when APPLIANCE_SERVING_ENGINE=vllm; several, comma-separated, "
                      "are serving replicas of one base model on this host. An entry BASE_MODEL=URL serves that "
                      "base model only (one vLLM server per base model); plain URLs serve the others."),
    )
    vllm_api_key_file: Path | None = field(
        default=None,
        metadata=_env("APPLIANCE_VLLM_API_KEY_FILE",
                      "File holding the token the vLLM servers were started with (--api-key); empty: none."),
    )
    reconcile_s: int = field(
        default=30,
        metadata=_env("APPLIANCE_SERVING_RECONCILE_S",
                      "Seconds between checks that every vLLM replica holds exactly the published adapters "
                      "(0: only when the engine starts).", minimum=0),
    )
    shm_dir: Path = field(
        default=Path("/dev/shm"),
        metadata=_env("APPLIANCE_SERVING_SHM_DIR",
                      "tmpfs where decrypted adapters wait for vLLM to read them (private 0700 directories)."),
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata=_env("APPLIANCE_SERVING_DEVICE", "Device of the embedded engine.")
    )
    max_resident_adapters: int = field(
        default=8,
        metadata=_env("APPLIANCE_MAX_RESIDENT_ADAPTERS", "Adapters kept loaded per base model (LRU).", minimum=1),
    )
    max_engines: int = field(
        default=2, metadata=_env("APPLIANCE_MAX_ENGINES", "Base models kept resident at once (LRU).", minimum=1)
    )

    @property
    def vllm_urls(self) -> list[str]:
        """Every serving replica ``APPLIANCE_VLLM_URL`` names, in order (base model names dropped)."""
        return [u.strip().rstrip("/").partition("=")[2] or u.strip().rstrip("/")
                for u in self.vllm_url.split(",") if u.strip()]

    def vllm_urls_for(self, base_model: str) -> list[str]:
        """The serving replicas of ``base_model``: its own entries of ``APPLIANCE_VLLM_URL``, else the plain URLs.

        Raises:
            ValueError: ``APPLIANCE_VLLM_URL`` names servers for other base models only.
        """
        from serving.replicas import replicas_for

        return replicas_for(self.vllm_url, base_model)


@dataclass(frozen=True)
class JobSettings:
    """The job queue shared by every control-plane replica, and where its training workers run.

    Workers run as sandboxed processes on this host, or on a Ray cluster.
    """

    lease_s: int = field(
        default=60,
        metadata=_env("APPLIANCE_JOB_LEASE_S",
                      "Seconds a running job stays its scheduler's without a heartbeat; then another takes it over.",
                      minimum=10),
    )

    worker_isolation: Literal["sandbox", "network-only", "none"] = field(
        default="sandbox",
        metadata=_env("APPLIANCE_WORKER_ISOLATION",
                      "How local training workers are shut in: sandbox (bubblewrap: own namespaces and user, a "
                      "file system view of only what the job needs, a seccomp filter), network-only (own network "
                      "namespace only) or none. Jobs fail, never run weaker, when the level cannot be built; a "
                      "weaker level is audited at start-up and on every job."),
    )
    executor: Literal["local", "ray"] = field(
        default="local",
        metadata=_env("APPLIANCE_EXECUTOR", "local (sandboxed worker processes here) or ray (Ray job submission)."),
    )
    ray_address: str = field(
        default="",
        metadata=_env("APPLIANCE_RAY_ADDRESS", "Ray dashboard URL that takes job submissions, e.g. http://ray-head:8265."),
    )
    ray_token_file: Path | None = field(
        default=None,
        metadata=_env("APPLIANCE_RAY_TOKEN_FILE",
                      "File holding the Ray cluster's auth token (clusters run with RAY_AUTH_MODE=token)."),
    )
    ray_node_key_file: Path | None = field(
        default=None,
        metadata=_env("APPLIANCE_RAY_NODE_KEY_FILE",
                      "File of 32 random bytes held at this same path on the control plane and on every Ray node "
                      "(distributed like the Ray token, readable by Ray's user only): each launch's tunnel ticket "
                      "is derived from it, so the Ray job's details and logs carry only a public nonce."),
    )
    ray_callback_address: str = field(
        default="127.0.0.1:0",
        metadata=_env("APPLIANCE_RAY_CALLBACK_ADDRESS",
                      "host:port where the control plane listens for its Ray workers (port 0: any free port)."),
    )
    ray_callback_advertise: str = field(
        default="",
        metadata=_env("APPLIANCE_RAY_CALLBACK_ADVERTISE",
                      "host:port the Ray workers dial to reach that listener; empty means the listening address."),
    )
    ray_python: str = field(
        default="",
        metadata=_env("APPLIANCE_RAY_PYTHON",
                      "Python on the Ray nodes with this appliance version installed; empty means this server's."),
    )
    ray_max_workers: int = field(
        default=8,
        metadata=_env("APPLIANCE_RAY_MAX_WORKERS", "Most data-parallel workers one job may ask for (compute.workers).",
                      minimum=1),
    )
    training_device_memory_gib: float = field(
        default=0.0,
        metadata=_env("APPLIANCE_TRAINING_DEVICE_MEMORY_GIB",
                      "GiB of one training GPU, for the memory plan made when a job is created (Ray workers' cards, "
                      "or to plan for a smaller card than this host's); 0 = detect (nvidia-smi, else host memory).",
                      minimum=0),
    )
    ray_connect_timeout_s: int = field(
        default=600,
        metadata=_env("APPLIANCE_RAY_CONNECT_TIMEOUT_S",
                      "Seconds a submitted Ray job has for all its workers to connect back before it counts as lost.",
                      minimum=10),
    )


@dataclass(frozen=True)
class AdvisorySettings:
    """Advisory data for ``appliance deps audit`` (known-vulnerable installed dependencies)."""

    db: Path | None = field(
        default=None,
        metadata=_env("APPLIANCE_ADVISORY_DB",
                      "OSV advisories for `appliance deps audit`: osv.dev's PyPI all.zip or a directory of OSV "
                      "files; empty means the bundled safety-db snapshot of 2021."),
    )


@dataclass(frozen=True)
class Settings:
    """All settings, one attribute per concern."""

    home: HomeSettings
    database: DatabaseSettings
    server: ServerSettings
    keys: KeySettings
    log: LogSettings
    auth: AuthSettings
    intake: IntakeSettings
    portal: PortalSettings
    serving: ServingSettings
    audit: AuditSettings
    jobs: JobSettings
    retention: RetentionSettings
    advisories: AdvisorySettings

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.home.home / 'appliance.db'}"

    @property
    def blobs_dir(self) -> Path:
        return self.home.data_dir / "blobs"

    @property
    def key_file(self) -> Path:
        return self.keys.key_file or self.home.home / "keys" / "master.key"

    @property
    def signing_key_file(self) -> Path:
        return self.key_file.parent / "signing.key"

    @property
    def models_dir(self) -> Path:
        return self.home.home / "models"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(raw: str, typ: Any, meta: Mapping[str, Any]) -> Any:
    """Convert ``raw`` to ``typ``; raise ValueError with a sentence saying what was expected."""
    origin_args = get_args(typ)
    if typ is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
    if typ is int:
        lo, hi = meta.get("minimum"), meta.get("maximum")
        expected = "expected an integer" + (
            f" between {lo} and {hi}" if hi is not None else f" of at least {lo}" if lo is not None else ""
        )
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(expected) from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(expected)
        return value
    if typ is float:
        lo = meta.get("minimum")
        expected = "expected a number" + (f" of at least {lo}" if lo is not None else "")
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(expected) from None
        if number != number or (lo is not None and number < lo):  # NaN, or below the minimum
            raise ValueError(expected)
        return number
    if typ is Path or (origin_args and Path in origin_args):
        if not raw and type(None) in origin_args:
            return None
        if not raw:
            raise ValueError("expected a path")
        return Path(raw).expanduser().resolve()
    if origin_args and all(isinstance(a, str) for a in origin_args):  # Literal[...]
        choice = raw.upper() if all(a.isupper() for a in origin_args) else raw.lower()
        if choice not in origin_args:
            raise ValueError(f"expected one of {', '.join(origin_args)}")
        return choice
    return raw


def _load_section(cls: type, environ: Mapping[str, str], errors: list[str]) -> Any:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f.metadata["env"]
        if name not in environ:
            continue
        raw = environ[name].strip()
        try:
            values[f.name] = _parse(raw, hints[f.name], f.metadata)
        except ValueError as exc:
            errors.append(f"{name}={raw!r}: {exc} ({f.metadata['help']})")
    return cls(**values)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every ``APPLIANCE_*`` variable; raise :class:`SettingsError` listing all problems.

    Args:
        environ: Mapping to read instead of ``os.environ`` (tests pass their own).
    """
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    sections = {
        f.name: _load_section(get_type_hints(Settings)[f.name], environ, errors)
        for f in dataclasses.fields(Settings)
    }
    home = sections["home"]
    sections["home"] = dataclasses.replace(home, home=Path(home.home).expanduser().resolve())
    url = sections["database"].url
    if url and "://" not in url:
        errors.append(
            f"APPLIANCE_DATABASE_URL={url!r}: expected an SQLAlchemy URL such as "
            "'sqlite:////srv/appliance/appliance.db' or 'postgresql+psycopg://user@host/appliance'"
        )
    _check_jobs(sections["jobs"], errors)
    _check_serving(sections["serving"], errors)
    known = {f.metadata["env"] for cls in map(type, sections.values()) for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in environ if k.startswith("APPLIANCE_") and k not in known)
    if unknown:
        errors.append(
            f"unknown variable(s) {', '.join(unknown)}: known ones are {', '.join(sorted(known))}"
        )
    if errors:
        raise SettingsError(errors)
    return Settings(**sections)


def parse_host_port(value: str) -> tuple[str, int]:
    """``("host", port)`` from ``host:port`` (``[v6]:port`` too); ValueError naming what was expected."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:0 or ray-gw.internal:7070")
    return host, int(port)


def _check_jobs(jobs: JobSettings, errors: list[str]) -> None:
    """The Ray executor's variables are checked only when it is chosen, all problems at once."""
    if jobs.executor != "ray":
        return
    if not jobs.ray_address.startswith(("http://", "https://")):
        errors.append(f"APPLIANCE_RAY_ADDRESS={jobs.ray_address!r}: APPLIANCE_EXECUTOR=ray needs the Ray "
                      "dashboard's URL, e.g. http://ray-head:8265")
    if jobs.ray_token_file is None or not jobs.ray_token_file.is_file():
        errors.append(f"APPLIANCE_RAY_TOKEN_FILE={str(jobs.ray_token_file or '')!r}: APPLIANCE_EXECUTOR=ray needs "
                      "the file holding the cluster's Ray auth token (`ray get-auth-token`); Ray clusters without "
                      "token authentication are not supported")
    key = jobs.ray_node_key_file
    make_key = "make one with `head -c 32 /dev/urandom > FILE; chmod 0400 FILE` and copy it to every Ray node"
    if key is None or not key.is_file():
        errors.append(f"APPLIANCE_RAY_NODE_KEY_FILE={str(key or '')!r}: APPLIANCE_EXECUTOR=ray needs the node key "
                      f"file that the control plane and every Ray node hold at the same path; {make_key}")
    elif key.stat().st_size < 32:
        errors.append(f"APPLIANCE_RAY_NODE_KEY_FILE={str(key)!r}: holds {key.stat().st_size} bytes, need at least "
                      f"32 random bytes; {make_key}")
    elif key.stat().st_mode & 0o077:
        errors.append(f"APPLIANCE_RAY_NODE_KEY_FILE={str(key)!r}: mode {key.stat().st_mode & 0o777:04o} lets other "
                      "users read it; chmod 0400 (or 0600) it here and on the Ray nodes")
    for name, value in (("APPLIANCE_RAY_CALLBACK_ADDRESS", jobs.ray_callback_address),
                        ("APPLIANCE_RAY_CALLBACK_ADVERTISE", jobs.ray_callback_advertise)):
        if value:
            try:
                parse_host_port(value)
            except ValueError as exc:
                errors.append(f"{name}={value!r}: {exc}")
    wildcard = jobs.ray_callback_address.rpartition(":")[0] in ("0.0.0.0", "[::]", "::")
    if wildcard and not jobs.ray_callback_advertise:
        errors.append(f"APPLIANCE_RAY_CALLBACK_ADVERTISE='': the listener binds {jobs.ray_callback_address}, "
                      "so set the host:port the Ray nodes should dial")


def _check_serving(serving: ServingSettings, errors: list[str]) -> None:
    from serving.replicas import parse_replica_map

    try:
        parse_replica_map(serving.vllm_url)
    except ValueError as exc:
        errors.append(f"APPLIANCE_VLLM_URL={serving.vllm_url!r}: {exc}")
    if serving.engine != "vllm":
        return
    key = serving.vllm_api_key_file
    if key is not None and not key.is_file():
        errors.append(f"APPLIANCE_VLLM_API_KEY_FILE={str(key)!r}: no such file; write the vLLM servers' --api-key "
                      "token there (mode 0600) or leave the variable empty")


def describe_settings() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting, for ``appliance settings`` and the docs."""
    rows = []
    for section in dataclasses.fields(Settings):
        cls = get_type_hints(Settings)[section.name]
        for f in dataclasses.fields(cls):
            rows.append((f.metadata["env"], "" if f.default is None else str(f.default), f.metadata["help"]))
    return rows


@functools.cache
def get_settings() -> Settings:
    """Settings from the process environment, read once."""
    return load_settings()
