"""The node's configuration: loaded and validated once, YAML, then environment, then command line.

Sources, later ones winning:

1. the embedded defaults (the models below; ``config.yaml`` in the repository shows them, commented);
2. a YAML file: ``--config FILE``, else the ``PETRIAGE_CONFIG`` variable, else none;
3. environment variables ``PETRIAGE__SECTION__KEY=value`` (value parsed as YAML, e.g. ``[a, b]``);
4. command-line overrides ``--set section.key=value``.

Relative paths in a file are taken relative to that file's folder, so a unit or a cron job finds the
same files whatever its working directory; with no file they are relative to the working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.errors import ConfigError

ENV_FILE = "PETRIAGE_CONFIG"
ENV_PREFIX = "PETRIAGE__"


def _ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.strip():
        raise ValueError("an AE title of 1-16 characters, not all spaces")
    if re.search(r"[\\\x00-\x1f\x7f]", value):
        raise ValueError("an AE title without backslashes or control characters")
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """DICOM TLS for the listener: our certificate and key; ``ca`` set = callers need a certificate it signed."""

    cert: Path
    key: Path
    ca: Path | None = None


class NodeSettings(_Section):
    """The DICOM listener."""

    ae_title: AETitle = "PETRIAGE"
    # This node's name among the nodes that share one store (``petriage status`` lists them by it);
    # null: the host name. Give two nodes on one host different names.
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    # What this node runs: all (listener, study assembly, worker), receiver (listener and assembly) or
    # worker (analysis only). Receivers and workers on other hosts share store.url and storage.root.
    role: Literal["all", "receiver", "worker"] = "all"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for modalities on the network
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    allowed_source_ips: list[IPv4Network | IPv6Network] = Field(default_factory=list)  # addresses or CIDR
    tls: TLSSettings | None = None
    max_associations: Annotated[int, Field(ge=1, le=256)] = 10  # per receiver process
    # Listener processes on this host, all on node.port (SO_REUSEPORT: the kernel spreads associations
    # over them), so that several senders use several cores. Linux; 1 = one listener in the node itself.
    receivers: Annotated[int, Field(ge=1, le=32)] = 1
    max_pdu_size: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # bytes we accept per PDU; 0 = no limit
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0


class StorageSettings(_Section):
    """Where the node keeps its spool, database, outbox and logs."""

    root: Path = Path("./var")
    min_free_mb: Annotated[int, Field(ge=0)] = 1024  # below this much free space C-STORE answers out-of-resources


class StoreSettings(_Section):
    """Which database holds the queue and the audit trail."""

    # null: SQLite in <storage.root>/petriage.db (one machine). Several nodes share a PostgreSQL store:
    # postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or leave the password to ~/.pgpass / PGPASSWORD).
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("a sqlite:///PATH or postgresql://USER@HOST/DATABASE URL")
        return value.replace("postgresql://", "postgresql+psycopg://", 1)


class RetentionSettings(_Section):
    """How long received studies and their results stay on the node's disk."""

    # Days after its last job changed that a study whose results were delivered is removed (spool,
    # outbox, rows; the event log stays). null: never by age.
    days: Annotated[float, Field(gt=0)] | None = 14.0
    # Under disk pressure delivered studies go earlier, oldest first, while free space is below
    # storage.min_free_mb plus this much, so new studies keep being accepted.
    headroom_mb: Annotated[int, Field(ge=0)] = 1024
    interval_minutes: Annotated[float, Field(gt=0)] = 10.0


class WorkerSettings(_Section):
    """The analysis worker."""

    # How long a worker's claim on a job lasts between its heartbeats: a job whose worker died with its
    # host is taken up by another node after this. (A worker that dies while its node lives, or whose
    # node restarts on the same host, is noticed at once.)
    lease_seconds: Annotated[float, Field(ge=2, le=3600)] = 120.0
    # Worker processes on this host (each loads the model once and analyses one study at a time).
    processes: Annotated[int, Field(ge=1, le=32)] = 1


class StudySettings(_Section):
    """When a study counts as completely received."""

    quiet_seconds: float = Field(default=20.0, gt=0)
    max_wait_seconds: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _max_wait_covers_quiet(self) -> StudySettings:
        if self.max_wait_seconds < self.quiet_seconds:
            raise ValueError(f"max_wait_seconds ({self.max_wait_seconds}) at least quiet_seconds "
                             f"({self.quiet_seconds})")
        return self


class SeriesSettings(_Section):
    """Which series of a study may be analysed as the CTPA (node/selection.py ranks the eligible ones)."""

    min_slices: Annotated[int, Field(ge=2, le=5000)] = 16
    max_slice_thickness_mm: Annotated[float, Field(gt=0, le=20)] = 10.0
    require_original_primary: bool = True  # refuse DERIVED/SECONDARY reformats (MIPs, MPRs)
    max_gap_factor: Annotated[float, Field(ge=1.0, le=10)] = 1.5  # a gap over this x the median spacing: slices missing


class ModelSettings(_Section):
    """The model bundle and where it runs."""

    bundle: Path = Path("models/demo")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "int8", "fp16"] = "auto"
    key_images: Annotated[int, Field(ge=1, le=20)] = 3  # key slices shown as SC overlays and SR regions
    threads: Annotated[int, Field(ge=0, le=256)] = 0  # CPU threads for onnxruntime; 0 lets it decide


#: The result objects the node writes, by the name config uses (``destinations[].objects``).
ObjectKind = Literal["sc", "sr", "seg", "kos"]
OBJECT_KINDS: tuple[ObjectKind, ...] = ("sc", "sr", "seg", "kos")


class Destination(_Section):
    """A peer that receives the results (usually the PACS).

    ``kind: dimse`` (C-STORE to ``ae_title@host:port``; ``tls_ca`` set = DICOM TLS) or ``kind: dicomweb``
    (STOW-RS to ``url``, e.g. ``https://pacs/dicom-web``; ``tls_ca`` verifies its certificate, ``username``
    with ``password_file`` = HTTP basic authentication). ``objects``: which of the node's objects it gets
    (a PACS that refuses SEG: ``[sc, sr, kos]``).
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: AETitle = "PACS"  # dimse: all three required
    host: str = ""
    port: Port = 104
    url: str = ""
    username: str = ""
    password_file: Path | None = None
    objects: list[ObjectKind] = Field(default_factory=lambda: list(OBJECT_KINDS), min_length=1)
    tls_ca: Path | None = None  # CA that signed the destination's certificate
    tls_cert: Path | None = None  # our client certificate and key, when the destination asks for one
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _where(self) -> Destination:
        missing = [k for k in ("ae_title", "host", "port") if k not in self.model_fields_set]
        if self.kind == "dimse" and missing:
            raise ValueError(f"{', '.join(missing)} for a dimse destination")
        if self.kind == "dicomweb" and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError("a url (http:// or https://, e.g. https://pacs.example/dicom-web) "
                             "for a dicomweb destination")
        if self.password_file is not None and not self.username:
            raise ValueError("a username with password_file")
        return self

    @property
    def where(self) -> str:
        """How logs, job reasons and queue show name this destination."""
        if self.kind == "dicomweb":
            return f"{self.name} ({self.url})"
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class OutputSettings(_Section):
    """What the node writes for each result (which of them a destination gets: ``destinations[].objects``)."""

    seg: bool = True  # DICOM Segmentation of the attention map (node/outputs/seg.py)
    seg_floor: Annotated[float, Field(gt=0, lt=1)] = 0.5  # attention probability below which a pixel is 0
    seg_binary_threshold: Annotated[float, Field(gt=0, lt=1)] | None = None  # a second, BINARY SEG at this value
    kos: bool = True  # Key Object Selection: key images and the results
    # The exam's code in the SR (Performed Procedure Code Sequence) when the CT header carries no
    # Procedure Code Sequence of its own: "value^scheme^meaning"; empty: LOINC 36147-7
    # "CTA Pulmonary arteries W contrast IV".
    procedure_code: Annotated[str, Field(pattern=r"^$|^[^^]+\^[^^]+\^[^^]+$")] = ""

    @model_validator(mode="after")
    def _threshold_above_floor(self) -> OutputSettings:
        if self.seg_binary_threshold is not None and self.seg_binary_threshold < self.seg_floor:
            raise ValueError(f"seg_binary_threshold at least seg_floor ({self.seg_floor})")
        return self


class TriageSettings(_Section):
    """Worklist priority (node/triage.py): higher is read first; the worker's queue follows it too."""

    positive: int = 1000
    pending: int = 500
    negative: int = 0
    probability_weight: Annotated[float, Field(ge=0)] = 100.0
    urgent_bonus: int = 200
    urgent_values: list[str] = Field(default_factory=lambda: ["STAT", "HIGH", "URGENT", "ASAP"])


class HL7Settings(_Section):
    """An HL7 v2.5.1 ORU^R01 result message over MLLP to a RIS."""

    host: Annotated[str, Field(min_length=1)]
    port: Port
    sending_application: str = "PETRIAGE"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    timeout_seconds: Annotated[float, Field(gt=0)] = 10.0


class WebhookSettings(_Section):
    """A JSON POST to a chat or paging system (no patient names, IDs or birth dates in it)."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    timeout_seconds: Annotated[float, Field(gt=0)] = 10.0


class NotifySettings(_Section):
    """Who hears of a result beyond the PACS; ``results``: positive ones only, or all."""

    results: Literal["positive", "all"] = "positive"
    hl7: HL7Settings | None = None
    webhook: WebhookSettings | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 12


class MetricsSettings(_Section):
    """The Prometheus endpoint (http://host:port/metrics); port 0 switches it off."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


class WebTLS(_Section):
    """The console's HTTPS certificate and key (PEM)."""

    cert: Path
    key: Path


def _loopback_only() -> list[IPv4Network | IPv6Network]:
    return [IPv4Network("127.0.0.1/32")]


class TrustedProxy(_Section):
    """A reverse proxy that logs users in itself and names them in a header (node/web/security.py)."""

    header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+$")] = "X-Remote-User"
    # Only requests from these addresses may name a user; anyone else must log in.
    addresses: list[IPv4Network | IPv6Network] = Field(default_factory=_loopback_only)


class WebSettings(_Section):
    """The web console (petriage web): worklist, study pages, queue control behind a login."""

    # Without tls the console listens on a loopback address only (a reverse proxy may publish it).
    host: str = "127.0.0.1"
    port: Port = 8080
    tls: WebTLS | None = None
    session_hours: Annotated[float, Field(gt=0, le=24 * 7)] = 8.0
    # Failed logins from one address or for one name within 15 minutes before further tries wait.
    login_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    trusted_proxy: TrustedProxy | None = None
    # Also start the console with `petriage serve` (role all or receiver).
    with_node: bool = False

    @model_validator(mode="after")
    def _loopback_without_tls(self) -> WebSettings:
        if self.tls is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"web.host {self.host!r} needs web.tls: without TLS the console listens on "
                             "127.0.0.1 only (put a TLS reverse proxy in front, or set web.tls)")
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # json: one object per line for a log collector


def _default_destinations() -> list[Destination]:
    return [Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)]


class Config(_Section):
    """Every setting of the node."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    destinations: list[Destination] = Field(default_factory=_default_destinations)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _unique_destination_names(self) -> Config:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names that are unique (repeated: {', '.join(dupes)})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise ConfigError(f"{source}: empty key")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _parse_value(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: cannot parse value {text!r}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> None:
    """Merge ``section.key=value`` strings (values parsed as YAML) into a nested mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set_path(data, key.strip(), _parse_value(text, f"--set {key}"), f"--set {key}")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping, or a ConfigError saying what is wrong with it."""
    return _read_file(path)


def describe(exc: ValidationError, source: str) -> str:
    """Every error of a pydantic validation as 'key: got value; expected ...' lines."""
    return _describe(exc, source)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown setting (value {err['input']!r}); check the spelling")
            continue
        expected = msg.removeprefix("Value error, ").removeprefix("Input should be ")
        lines.append(f"  {key}: got {err['input']!r}; expected {expected}")
    return "\n".join(lines)


PATH_KEYS = ("storage.root", "model.bundle", "node.tls.cert", "node.tls.key", "node.tls.ca")
DESTINATION_PATH_KEYS = ("tls_ca", "tls_cert", "tls_key", "password_file")


def _resolve(mapping: Any, key: str, base: Path) -> None:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if isinstance(value, str) and value and not Path(value).is_absolute():
        mapping[key] = str((base / value).resolve())


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for dotted in PATH_KEYS:
        *parents, key = dotted.split(".")
        mapping: Any = data
        for parent in parents:
            mapping = mapping.get(parent) if isinstance(mapping, dict) else None
        _resolve(mapping, key, base)
    for dest in data.get("destinations") or []:
        for key in DESTINATION_PATH_KEYS:
            _resolve(dest, key, base)


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None,
                overrides: Iterable[str] = ()) -> Config:
    """Load, merge and validate the configuration.

    Parameters
    ----------
    path
        YAML file; when None, ``$PETRIAGE_CONFIG`` if set, else embedded defaults only.
    environ
        Environment to read (``os.environ`` when None).
    overrides
        ``section.key=value`` strings from the command line.

    Raises
    ------
    ConfigError
        With every offending key, the value given and what was expected.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_FILE):
        path = environ[ENV_FILE]
    data: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        path = Path(path)
        data = _read_file(path)
        _resolve_paths(data, path.parent)
        source = str(path)
    for name, text in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_path(data, dotted, _parse_value(text, name), f"environment {name}")
    apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
