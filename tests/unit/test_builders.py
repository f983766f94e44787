from __future__ import annotations

from pgscale.api.common import JobTemplate
from pgscale.kube import ObjectRef
from pgscale.specs import builders

OWNER = ObjectRef("pgscale.io/v1alpha1", "RetentionPolicy", "ns", "archive-tasks", "1234-5678-90ab")


def test_cron_job_is_owned_and_never_overlaps() -> None:
    obj = builders.cron_job(
        OWNER,
        suffix="retention",
        schedule="0 2 1 * *",
        time_zone="UTC",
        suspend=False,
        args=builders.job_args("retention", OWNER),
        template=None,
        default_image="img",
    )
    assert obj["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert obj["metadata"]["ownerReferences"][0]["controller"] is True
    assert obj["spec"]["concurrencyPolicy"] == "Forbid"
    pod = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["job", "retention", "--namespace", "ns", "--name", "archive-tasks"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["restartPolicy"] == "Never"


def test_template_overrides_image_and_resources() -> None:
    template = JobTemplate.model_validate({"image": "custom:1", "resources": {"limits": {"memory": "256Mi"}}})
    obj = builders.cron_job(
        OWNER,
        suffix="retention",
        schedule="@daily",
        time_zone=None,
        suspend=True,
        args=[],
        template=template,
        default_image="img",
    )
    container = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "custom:1" and container["resources"] == {"limits": {"memory": "256Mi"}}
    assert obj["spec"]["suspend"] is True and "timeZone" not in obj["spec"]


def test_long_names_stay_within_cronjob_limit() -> None:
    owner = ObjectRef("v", "K", "ns", "x" * 60, "abcdef12-3456")
    name = builders.job_name(owner, "partition-maintenance")
    assert len(name) <= 52 and name.endswith("abcdef12")


def test_every_job_survives_disruptions_without_using_its_retries() -> None:
    """A deleted or evicted pod ends before its replacement starts and does not count against backoffLimit."""
    standalone = builders.job(OWNER, name="x-1", suffix="x", args=["job"], template=None, default_image="img")
    scheduled = builders.cron_job(
        OWNER,
        suffix="x",
        schedule="0 * * * *",
        time_zone=None,
        suspend=False,
        args=["job"],
        template=None,
        default_image="img",
        active_deadline_seconds=60,
    )
    for spec in (standalone["spec"], scheduled["spec"]["jobTemplate"]["spec"]):
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["podFailurePolicy"]["rules"] == [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        ]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert scheduled["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 60
    standalone["spec"]["podFailurePolicy"]["rules"].clear()
    assert builders.JOB_DISRUPTION_POLICY["podFailurePolicy"]["rules"], "each Job gets its own copy"
