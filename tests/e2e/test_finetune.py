"""Fine-tuning from the command line, against a real medboxd process whose
trainer is the TEST DOUBLE tests/test-doubles/fake-trainer (its outcome is
scripted by the output name: success, an out-of-memory failure, a slow job to
cancel): upload, reject, create, watch, list, cancel, with medboxctl's JSON
output and exit codes. The real trainer runs in test_finetune_resume.py and
in the crates' tests."""

import json
import subprocess

import pytest

from conftest import BIN_DIR, ROOT, Medboxd, storage_params

FAKE_TRAINER = ROOT / "tests" / "test-doubles" / "fake-trainer"


@pytest.fixture(params=storage_params())
def finetune_server(request, tmp_path):
    srv = Medboxd(
        tmp_path,
        request.param,
        extra_config=f'[finetune]\ntrainer_path = "{FAKE_TRAINER}"\ncancel_grace_seconds = 2\n',
    )
    yield srv
    code = srv.terminate()
    assert code == 0, f"medboxd exited with {code}:\n{srv.log_text()}"


def test_upload_train_watch_and_cancel_with_medboxctl(finetune_server, tmp_path):
    server = finetune_server

    def ctl(*args):
        result = subprocess.run(
            [str(BIN_DIR / "medboxctl"), "--addr", server.addr, "--key", server.admin_key, "--json", *args],
            capture_output=True, text=True, timeout=120,
        )
        return result.returncode, [json.loads(line) for line in result.stdout.splitlines() if line.strip()], result.stderr

    good = tmp_path / "good.jsonl"
    good.write_text(
        "".join(
            json.dumps({"instruction": "Flag this potassium", "input": f"K {5 + i % 3}.{i} mmol/L", "output": "high"}) + "\n"
            for i in range(20)
        )
    )
    code, uploaded, _ = ctl("datasets", "upload", str(good), "--name", "lab-flags", "--format", "alpaca")
    assert code == 0
    assert uploaded[0]["state"] == "accepted"
    assert (uploaded[0]["train_examples"], uploaded[0]["eval_examples"]) == (19, 1)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    code, rejected, stderr = ctl("datasets", "upload", str(bad), "--name", "lab-bad", "--format", "alpaca")
    assert code != 0 and "rejected" in stderr
    assert rejected[0]["state"] == "rejected"
    assert [(e["line"], e["kind"]) for e in rejected[0]["errors"]] == [(2, "missing_field")]

    code, created, _ = ctl("finetune", "create", "--base", "medical", "--dataset", "lab-flags",
                           "--method", "lora", "--epochs", "2", "--lr", "1e-4", "--output", "ok-lab")
    assert code == 0 and created[0]["id"].startswith("job_")
    job_id = created[0]["id"]
    code, events, _ = ctl("finetune", "watch", job_id)
    assert code == 0
    assert [e["step"] for e in events if e["kind"] == "progress"] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["kind"] == "state" and events[-1]["state"] == "succeeded"
    assert events[-1]["message"] == "registered ok-lab version 1"

    code, _, stderr = ctl("finetune", "create", "--base", "medical", "--dataset", "lab-bad",
                          "--method", "lora", "--output", "x")
    assert code != 0 and "FailedPrecondition" in stderr and "rejected" in stderr

    code, failing, _ = ctl("finetune", "create", "--base", "medical", "--dataset", "lab-flags",
                           "--method", "lora", "--output", "fail-lab")
    code, events, stderr = ctl("finetune", "watch", failing[0]["id"])
    assert code != 0 and "out of memory" in stderr
    assert events[-1]["state"] == "failed"

    code, slow, _ = ctl("finetune", "create", "--base", "medical", "--dataset", "lab-flags",
                        "--method", "lora", "--output", "slow-lab")
    code, cancelled, _ = ctl("finetune", "cancel", slow[0]["id"])
    assert code == 0 and cancelled[0]["state"] == "cancelled"

    code, jobs, _ = ctl("finetune", "list")
    assert code == 0
    assert [(j["output_name"], j["state"]) for j in jobs] == [
        ("slow-lab", "cancelled"),
        ("fail-lab", "failed"),
        ("ok-lab", "succeeded"),
    ]
    assert jobs[2]["model_version"] == 1 and jobs[2]["model_kind"] == "adapter"
    assert (server.data_dir / "models" / "ok-lab" / "1" / "manifest.json").is_file()
