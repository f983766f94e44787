"""Types shared by every pgscale kind.

These pydantic models are the single source of truth for the API: the CRDs in
``crds/`` are generated from them (see :mod:`pgscale.api.crdgen`), and the
operator parses every object it handles through them. Constraints that the
API server can check (patterns, ranges, CEL rules) live here, next to the
field they guard, so that a bad spec is rejected by ``kubectl apply`` instead
of surfacing later as a failed reconcile.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "pgscale.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A Postgres identifier as pgscale accepts it from a spec. Every identifier is
# quoted with psycopg's sql.Identifier anyway; the pattern keeps quotes,
# semicolons, NUL and whitespace out so that a typo cannot become a surprise.
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_$]*$"
# Fixed-length durations: 500ms, 30s, 5m, 1h, 2d, 1w.
DURATION_PATTERN = r"^[0-9]{1,9}(ms|s|m|h|d|w)$"
# Calendar ages: 90d, 12mo, 1y, or spelled out: "90 days", "12 months".
AGE_PATTERN = r"^[1-9][0-9]{0,4} ?(d|w|mo|y|days?|weeks?|months?|years?)$"
# Five-field cron or a predefined macro; field values are checked by the operator.
CRON_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
    r"|[0-9*,/?LW#A-Za-z-]+( [0-9*,/?LW#A-Za-z-]+){4})$"
)
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=IDENTIFIER_PATTERN)]
Duration = Annotated[str, StringConstraints(max_length=12, pattern=DURATION_PATTERN)]
# How long the operator waits between two looks at a resource: bounded per unit (under three years),
# so that 999999999w cannot overflow a timer or a date (OverflowError) after the API server accepted it.
PERIOD_PATTERN = r"^([0-9]{1,9}ms|[0-9]{1,7}s|[0-9]{1,6}m|[0-9]{1,4}h|[0-9]{1,3}d|[0-9]{1,2}w)$"
Period = Annotated[str, StringConstraints(max_length=12, pattern=PERIOD_PATTERN)]
# A fixed day-of-month in a fixed month that has no such day (April 31, February 30): never fires.
_SHORT_MONTHS = "4|6|9|11|apr|jun|sep|nov|APR|JUN|SEP|NOV|Apr|Jun|Sep|Nov"
NEVER_FIRES_RULE = (
    rf"!self.matches('^\\S+\\s+\\S+\\s+(3[01]\\s+(2|feb|FEB|Feb)|31\\s+({_SHORT_MONTHS}))\\s+[*?]$')",
    "schedule never fires: that month has no such day (April 31, February 30); pick a day the month has",
)
Age = Annotated[str, StringConstraints(max_length=16, pattern=AGE_PATTERN)]
Cron = Annotated[str, StringConstraints(max_length=100, pattern=CRON_PATTERN)]
ObjectName = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]
ShortText = Annotated[str, StringConstraints(max_length=1024)]
Timestamp = Annotated[str, StringConstraints(max_length=64)]


# A Kubernetes quantity: 16Gi or 4, written as a string or an integer.
Quantity = Annotated[int | str, Field(json_schema_extra={"pattern": QUANTITY_PATTERN})]


def immutable(message: str) -> dict[str, Any]:
    """A CEL rule that refuses changes to a field once it is set."""
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": message}]}


def cel(*rules: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """CEL rules as (rule, message[, messageExpression]) tuples, for ``json_schema_extra``."""
    out = []
    for rule in rules:
        entry = {"rule": rule[0], "message": rule[1]}
        if len(rule) == 3:
            entry["messageExpression"] = rule[2]
        out.append(entry)
    return {"x-kubernetes-validations": out}


def default_of(model: type[BaseModel], field: str) -> Any:
    """A field's default as its model declares it, for code that reads an unparsed spec."""
    return model.model_fields[field].default


def wire_name(model: type[BaseModel], field: str) -> str:
    """A field's name on the wire (camelCase), as its model declares it."""
    return model.model_fields[field].alias or field


class Model(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True)

    def wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class LocalObjectReference(Model):
    """A reference to an object in the same namespace."""

    name: ObjectName = Field(description="Name of the referenced object in the same namespace.")


class ProfileReference(Model):
    """Which DatabaseProfile (in the same namespace) holds the connection to use."""

    name: ObjectName = Field(description="Name of a DatabaseProfile in the same namespace; its connection is used.")


class TableReference(Model):
    """A table, named exactly as in the database (case matters: "Task" is not task)."""

    schema_: Identifier = Field(
        default="public",
        alias="schema",
        description="Schema of the table, exactly as in the database (case-sensitive).",
    )
    name: Identifier = Field(description="Name of the table, exactly as in the database (case-sensitive, e.g. Task).")

    def qualified(self) -> str:
        """Human-readable, quoted name for messages (never used to build SQL)."""
        return f'"{self.schema_}"."{self.name}"'


class ResourceRequirements(Model):
    """CPU and memory requests and limits for a container pgscale creates."""

    requests: dict[str, Quantity] | None = Field(
        default=None,
        description="Minimum resources, e.g. {cpu: 100m, memory: 128Mi}.",
        json_schema_extra={"maxProperties": 8},
    )
    limits: dict[str, Quantity] | None = Field(
        default=None,
        description="Maximum resources, e.g. {memory: 256Mi}.",
        json_schema_extra={"maxProperties": 8},
    )


class JobTemplate(Model):
    """How the Jobs and CronJobs that pgscale creates for this resource are run."""

    image: str | None = Field(
        default=None,
        max_length=512,
        description="Container image running `pgscale job ...`; defaults to the operator's own image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy of the job container."
    )
    service_account_name: ObjectName | None = Field(
        default=None, description="ServiceAccount the job pod runs as; defaults to the namespace's default."
    )
    resources: ResourceRequirements | None = Field(default=None, description="Resources of the job container.")
    backoff_limit: int = Field(default=3, ge=0, le=100, description="Retries of a failed job pod before the Job fails.")
    ttl_seconds_after_finished: int = Field(
        default=86400,
        ge=0,
        le=31536000,
        description="How long finished Jobs are kept for inspection before Kubernetes deletes them.",
    )


# --- status ---------------------------------------------------------------------------

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """A condition shaped like metav1.Condition, as kstatus, Flux and Argo CD read it."""

    type: str = Field(max_length=316, description="Type of condition: Ready, Reconciling, Stalled, ...")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the condition was set for."
    )
    last_transition_time: Timestamp = Field(description="When the condition last changed status (RFC 3339).")
    reason: str = Field(
        max_length=1024,
        description="CamelCase reason for the last transition; docs/troubleshooting.md lists them.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details, including the fix.")


class BaseStatus(Model):
    """Status fields every pgscale kind has."""

    observed_generation: int | None = Field(default=None, description="The .metadata.generation the status reflects.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling and Stalled, plus kind-specific conditions.",
        json_schema_extra={
            "maxItems": 32,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )

    @classmethod
    def from_stored(cls, raw: object) -> Self:
        """Another object's status as the API server returns it, read for display or comparison, never failing.

        An operator of another version may have written it: a field this model does not know is
        ignored, and one it cannot read is left out, so the rest still reads. An empty object reads
        as absent.
        """
        data = {k: v for k, v in raw.items() if v is not None and v != {}} if isinstance(raw, dict) else {}
        while True:
            try:
                return cls.model_validate(data, extra="ignore")
            except ValidationError as exc:
                bad = {e["loc"][0] for e in exc.errors() if e["loc"]} & data.keys()
                if not bad:
                    return cls()
                data = {k: v for k, v in data.items() if k not in bad}


class PrinterColumn(Model):
    """One additionalPrinterColumn of a CRD."""

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str = Field(alias="jsonPath")
    priority: int = 0
    description: str = ""


class KindInfo(Model):
    """Naming and presentation of a kind in its CRD."""

    kind: str
    plural: str
    singular: str
    short_names: list[str]
    columns: list[PrinterColumn]


READY_COLUMNS = [
    PrinterColumn(
        name="Ready",
        type="string",
        json_path='.status.conditions[?(@.type=="Ready")].status',
        description="Whether the resource has reached its desired state.",
    ),
    PrinterColumn(
        name="Status",
        type="string",
        json_path='.status.conditions[?(@.type=="Ready")].message',
        priority=1,
        description="One line on what the resource is doing or waiting for.",
    ),
]
AGE_COLUMN = PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp")


class Resource(Model):
    """Root of a custom resource: apiVersion, kind, metadata, spec, status."""

    info: ClassVar[KindInfo]
    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str
    metadata: dict[str, Any] = Field(default_factory=dict)
