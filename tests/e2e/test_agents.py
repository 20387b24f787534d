"""The Agents service against a real medboxd process: the catalogue over
gRPC (grpcio) and through medboxctl, and the knowledge base the agents cite
managed with medboxctl (real MiniLM embeddings). Full runs of every agent with the tiny
model are in the Rust integration test (crates/medbox-server/tests/it/agents.rs),
which serves a copy of the tiny model with a longer context."""

import json
import subprocess

import grpc
import pytest

from conftest import BIN_DIR, ROOT, Medboxd


@pytest.fixture(scope="module")
def agents_server(tmp_path_factory):
    specs = ROOT / "crates" / "medbox-agents" / "specs"
    srv = Medboxd(
        tmp_path_factory.mktemp("medboxd-agents"),
        "sqlite",
        extra_config=f'[agents]\nspecs_dir = "{specs}"\ndefault_model = "medical"\n'
        '[knowledge]\nembedding_model = "minilm"\n',
    )
    yield srv
    assert srv.terminate() == 0, srv.log_text()


def test_list_agents_shows_the_catalogue(pb, agents_server):
    stub = pb.agents_pb2_grpc.AgentsStub(agents_server.channel)
    agents = stub.ListAgents(pb.agents_pb2.ListAgentsRequest()).agents
    assert len(agents) == 20
    by_id = {agent.id: agent for agent in agents}
    lab = by_id["lab_report_interpretation"]
    assert lab.name and lab.name_zh == "检验报告解读" and lab.description
    assert json.loads(lab.input_schema_json)["type"] == "object"
    assert json.loads(lab.output_schema_json)["type"] == "object"
    assert "lab_interpret" in lab.tools


def test_an_unknown_agent_is_not_found_by_name(pb, agents_server):
    stub = pb.agents_pb2_grpc.AgentsStub(agents_server.channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.RunAgent(pb.agents_pb2.RunAgentRequest(agent="oracle", input_json="{}"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "oracle" in error.value.details()


def test_medboxctl_agents_list(agents_server):
    result = subprocess.run(
        [str(BIN_DIR / "medboxctl"), "--addr", agents_server.addr, "--key", agents_server.admin_key,
         "--json", "agents", "list"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == 20
    assert {"id", "name_zh", "name_en", "tools"} <= rows[0].keys()


def ctl_json(server, *args):
    result = subprocess.run(
        [str(BIN_DIR / "medboxctl"), "--addr", server.addr, "--key", server.admin_key, "--json", *args],
        capture_output=True, text=True, timeout=120,
    )
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines() if line.strip()], result.stderr


def test_medboxctl_knowledge_add_list_search_delete(agents_server, tmp_path):
    hypertension = tmp_path / "hypertension.md"
    hypertension.write_text(
        "# Hypertension: outpatient guideline\n\n## Diagnosis\n"
        "Diagnose hypertension when clinic blood pressure is 140/90 mmHg or higher on two visits.\n\n"
        "## Treatment\nStart amlodipine or enalapril; combine both if the target is not reached in four weeks.\n"
    )
    gout = tmp_path / "gout.txt"
    gout.write_text("Gout flares: give colchicine early; lower urate below 360 umol/L with allopurinol.\n")
    code, added, stderr = ctl_json(agents_server, "knowledge", "add", str(hypertension), str(gout))
    assert code == 0, stderr
    assert [row["title"] for row in added] == ["Hypertension: outpatient guideline", "gout.txt"]
    assert [row["format"] for row in added] == ["markdown", "text"]
    assert all(row["chunk_count"] >= 1 and row["embedding_model"] == "minilm" for row in added)
    code, again, _ = ctl_json(agents_server, "knowledge", "add", str(gout))
    assert code == 0 and again[0]["already_present"] and again[0]["id"] == added[1]["id"]

    code, listed, _ = ctl_json(agents_server, "knowledge", "list")
    assert code == 0 and {row["id"] for row in listed} == {row["id"] for row in added}

    code, found, _ = ctl_json(agents_server, "knowledge", "search", "which drug lowers urate?", "--limit", "1")
    assert code == 0 and found[0]["document_id"] == added[1]["id"]
    code, found, _ = ctl_json(agents_server, "knowledge", "search", "blood pressure threshold for diagnosis")
    assert found[0]["citation"] == "Hypertension: outpatient guideline § Diagnosis"

    code, _, _ = ctl_json(agents_server, "knowledge", "delete", added[1]["id"])
    assert code == 0
    code, listed, _ = ctl_json(agents_server, "knowledge", "list")
    assert [row["id"] for row in listed] == [added[0]["id"]]
    code, _, stderr = ctl_json(agents_server, "knowledge", "delete", added[1]["id"])
    assert code != 0 and "NotFound" in stderr and added[1]["id"] in stderr
