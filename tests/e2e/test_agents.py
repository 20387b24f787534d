"""The Agents service against a real medboxd process: the catalogue over
gRPC (grpcio) and through medboxctl. Full runs of every agent with the tiny
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
        extra_config=f'[agents]\nspecs_dir = "{specs}"\ndefault_model = "medical"\n',
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
