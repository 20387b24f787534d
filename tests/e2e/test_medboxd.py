"""medboxd end to end, as a hospital application sees it: a real process,
reached over gRPC by an independent client (Python grpcio)."""

import signal
import sqlite3
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2


def inference(pb, server):
    return pb.inference_pb2_grpc.InferenceStub(server.channel)


def greedy(pb, max_tokens, **extra):
    return pb.inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


def test_health_is_serving_without_a_key(server):
    health = health_pb2_grpc.HealthStub(server.plain_channel)
    for service in ["", "medbox.v1.Inference", "medbox.v1.Admin"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services_without_a_key(server, version):
    # v1 and v1alpha share their messages; grpcio-reflection ships only the
    # v1alpha stubs, so v1 is called by its method path.
    call = server.plain_channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_v1alpha_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_v1alpha_pb2.ServerReflectionResponse.FromString,
    )
    replies = call(iter([reflection_v1alpha_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"medbox.v1.Inference", "medbox.v1.Admin", "grpc.health.v1.Health"} <= names, names


def test_generate_returns_tokens(pb, server):
    reply = inference(pb, server).Generate(
        pb.inference_pb2.GenerateRequest(
            model="tiny", prompt="Patient reports chest pain", sampling=greedy(pb, 16), request_id="e2e-1"
        ),
        timeout=60,
    )
    assert len(reply.token_ids) > 0
    assert reply.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens == len(reply.token_ids)
    assert reply.request_id == "e2e-1"
    assert reply.model == "tiny"


def test_alias_routes_to_the_model(pb, server):
    reply = inference(pb, server).Generate(
        pb.inference_pb2.GenerateRequest(model="medical", prompt="Fever", sampling=greedy(pb, 4)), timeout=60
    )
    assert reply.model == "tiny"


def test_stream_joins_to_the_unary_answer(pb, server):
    stub = inference(pb, server)
    request = pb.inference_pb2.GenerateRequest(
        model="tiny", prompt="血压 150/95 mmHg，建议", sampling=greedy(pb, 40, ignore_eos=True)
    )
    unary = stub.Generate(request, timeout=60)
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert "".join(chunk.text for chunk in chunks) == unary.text
    assert [t for chunk in chunks for t in chunk.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 40
    assert all(chunk.finish_reason == "" for chunk in chunks[:-1])


def test_unknown_model_is_not_found(pb, server):
    with pytest.raises(grpc.RpcError) as err:
        inference(pb, server).Generate(
            pb.inference_pb2.GenerateRequest(model="no-such-model", prompt="hi"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.value.details()


@pytest.mark.parametrize(
    "prompt,sampling,field",
    [
        ("", {}, "prompt"),
        ("hello", {"max_tokens": 1_000_000}, "max_tokens"),
        ("hello", {"top_p": 1.5}, "top_p"),
        ("hello", {"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_fields_are_invalid_argument(pb, server, prompt, sampling, field):
    with pytest.raises(grpc.RpcError) as err:
        inference(pb, server).Generate(
            pb.inference_pb2.GenerateRequest(
                model="tiny", prompt=prompt, sampling=pb.inference_pb2.SamplingParams(**sampling)
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details(), err.value.details()


def test_tokenize_and_list_models(pb, server):
    stub = inference(pb, server)
    tokens = stub.Tokenize(pb.inference_pb2.TokenizeRequest(model="tiny", text="hemoglobin 120 g/L"), timeout=10)
    assert len(tokens.tokens) > 0
    models = stub.ListModels(pb.inference_pb2.ListModelsRequest(), timeout=10).models
    assert [(m.name, m.kind, m.state, m.architecture) for m in models] == [
        ("tiny", "causal-lm", "ready", "LlamaForCausalLM"),
        ("minilm", "embedding", "ready", "BertModel"),
    ]
    status = pb.admin_pb2_grpc.AdminStub(server.channel).Status(pb.admin_pb2.StatusRequest(), timeout=10)
    assert status.storage == server.storage
    assert status.models[0].name == "tiny"


def test_every_rpc_is_in_the_request_log(pb, server):
    if server.storage != "sqlite":
        pytest.skip("the SQLite file is read directly here; PostgreSQL is covered by the store's own tests")
    inference(pb, server).Generate(
        pb.inference_pb2.GenerateRequest(model="tiny", prompt="cough", sampling=greedy(pb, 3), request_id="logged"),
        timeout=60,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with sqlite3.connect(server.data_dir / "medbox.db") as db:
            rows = db.execute(
                "SELECT method, model, status_code, completion_tokens FROM request_log WHERE request_id = 'logged'"
            ).fetchall()
        if rows:
            break
        time.sleep(0.2)
    assert rows == [("medbox.v1.Inference/Generate", "tiny", 0, 3)]


def test_sigterm_during_a_stream_finishes_it_and_exits_zero(pb, fresh_server):
    stub = inference(pb, fresh_server)
    stream = stub.GenerateStream(
        pb.inference_pb2.GenerateRequest(
            model="tiny", prompt="Discharge advice:", sampling=greedy(pb, 300, ignore_eos=True)
        ),
        timeout=120,
    )
    first = next(stream)
    assert first.token_ids
    fresh_server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 300
    code = fresh_server.terminate(signal_it=False)
    assert code == 0, f"exit code {code}:\n{fresh_server.log_text()}"
    # After shutdown nothing is listening any more.
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(grpc.insecure_channel(fresh_server.addr)).result(timeout=2)


def chat_request(pb, messages, max_tokens=32):
    return pb.inference_pb2.ChatRequest(
        model="tiny",
        messages=[pb.inference_pb2.ChatMessage(role=role, content=content) for role, content in messages],
        sampling=greedy(pb, max_tokens, ignore_eos=True),
    )


def test_chat_stream_joins_to_the_unary_answer(pb, server):
    stub = inference(pb, server)
    request = chat_request(
        pb, [("system", "You are a careful nurse."), ("user", "What does HbA1c 8.1% mean?")]
    )
    unary = stub.Chat(request, timeout=60)
    chunks = list(stub.ChatStream(request, timeout=60))
    assert unary.finish_reason == chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == unary.text
    assert "".join(c.reasoning_text for c in chunks) == unary.reasoning_text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert unary.usage.completion_tokens == 32
    # The chat template wraps the messages: more prompt tokens than the text alone.
    tokens = stub.Tokenize(pb.inference_pb2.TokenizeRequest(model="tiny", text="What does HbA1c 8.1% mean?"), timeout=10)
    assert unary.usage.prompt_tokens > len(tokens.tokens)


def test_chat_names_a_bad_message(pb, server):
    with pytest.raises(grpc.RpcError) as err:
        inference(pb, server).Chat(chat_request(pb, [("user", "hi"), ("robot", "beep")]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].role" in err.value.details(), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        inference(pb, server).Chat(chat_request(pb, []), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in err.value.details()


def test_embed_matches_sentence_transformers(pb, server):
    from conftest import minilm_path
    from sentence_transformers import SentenceTransformer

    texts = ["Patient has a fever and a cough.", "患者发热三天，伴咳嗽。", "Blood pressure 150/95 mmHg"]
    reply = inference(pb, server).Embed(pb.inference_pb2.EmbedRequest(model="minilm", texts=texts), timeout=60)
    assert reply.dimensions == 384 and len(reply.embeddings) == 3
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts)
    for got, want in zip(reply.embeddings, reference):
        got = list(got.values)
        dot = sum(a * b for a, b in zip(got, want))
        norm_got = sum(a * a for a in got) ** 0.5
        norm_want = sum(float(b) * float(b) for b in want) ** 0.5
        assert abs(norm_got - 1.0) < 1e-4
        assert dot / (norm_got * norm_want) >= 0.9999


def test_embed_and_generate_refuse_the_wrong_kind(pb, server):
    stub = inference(pb, server)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.inference_pb2.EmbedRequest(model="tiny", texts=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tiny" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.inference_pb2.GenerateRequest(model="minilm", prompt="x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "minilm" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.inference_pb2.EmbedRequest(model="minilm", texts=[]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "texts" in err.value.details()


def test_calls_without_a_key_are_unauthenticated(pb, server):
    stub = pb.inference_pb2_grpc.InferenceStub(server.plain_channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListModels(pb.inference_pb2.ListModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in err.value.details()


def test_medboxctl_manages_keys_and_verifies_the_audit_chain(server):
    import json
    import subprocess

    from conftest import BIN_DIR

    def ctl(*args, key=server.admin_key):
        result = subprocess.run(
            [str(BIN_DIR / "medboxctl"), "--addr", server.addr, "--key", key, "--json", *args],
            capture_output=True, text=True, timeout=60,
        )
        return result.returncode, [json.loads(line) for line in result.stdout.splitlines() if line.strip()], result.stderr

    code, created, _ = ctl("keys", "create", "--label", "ward 5 tablet", "--scopes", "inference", "--expires", "30d")
    assert code == 0
    key = created[0]["key"]
    code, generated, _ = ctl("generate", "--model", "tiny", "--max-tokens", "4", "--temperature", "0", "fever", key=key)
    assert code == 0 and generated[0]["usage"]["completion_tokens"] == 4
    code, _, stderr = ctl("status", key=key)
    assert code != 0 and "PermissionDenied" in stderr and "admin" in stderr
    code, revoked, _ = ctl("keys", "revoke", created[0]["id"])
    assert code == 0 and revoked[0]["revoked"] is True
    code, _, stderr = ctl("generate", "--model", "tiny", "fever", key=key)
    assert code != 0 and "Unauthenticated" in stderr
    code, events, _ = ctl("audit", "list", "--key-id", created[0]["id"])
    assert code == 0
    assert [(e["method"], e["status_code"]) for e in events][-3:] == [
        ("medbox.v1.Inference/GenerateStream", 0),
        ("medbox.v1.Admin/Status", 7),
        ("medbox.v1.Inference/GenerateStream", 16),
    ]
    code, verdict, _ = ctl("audit", "verify")
    assert code == 0 and verdict[0]["ok"] is True and verdict[0]["checked"] > 5


@pytest.mark.parametrize("name", ["config/inference.toml", "config/training.toml", "medbox.demo.toml"])
def test_shipped_configs_pass_the_check(tmp_path, name):
    import subprocess

    from conftest import BIN_DIR, ROOT

    # The deploy configs point at /var/lib/medbox; check them against a stand-in folder.
    (tmp_path / "models" / "medical").mkdir(parents=True)
    (tmp_path / "models" / "medical" / "config.json").write_text("{}")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    (tmp_path / "models" / "minilm").mkdir(parents=True)
    (tmp_path / "models" / "minilm" / "config.json").write_text("{}")
    (tmp_path / "deploy" / "knowledge").mkdir(parents=True)
    text = (ROOT / "deploy" / name).read_text().replace("/var/lib/medbox", str(tmp_path))
    config = tmp_path / "medbox.toml"
    config.write_text(text)
    result = subprocess.run(
        [str(BIN_DIR / "medboxd"), "--check", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration ok" in result.stdout


def test_a_thinking_model_answers_with_reasoning_text_unary_and_streamed(pb, server, tmp_path):
    """A model whose template opens <think> at the generation prompt: what it
    writes before </think> is reasoning_text, unary and streamed alike."""
    import json
    import shutil

    from conftest import TINY_MODEL

    folder = tmp_path / "thinker"
    shutil.copytree(TINY_MODEL, folder)
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    admin = pb.admin_pb2_grpc.AdminStub(server.channel)
    loaded = admin.LoadModel(pb.admin_pb2.LoadModelRequest(name="thinker", path=str(folder)), timeout=60)
    assert loaded.model.state == "ready"
    stub = inference(pb, server)
    request = pb.inference_pb2.ChatRequest(
        model="thinker",
        messages=[pb.inference_pb2.ChatMessage(role="user", content="Is K 6.8 mmol/L dangerous?")],
        sampling=greedy(pb, 24, ignore_eos=True),
    )
    unary = stub.Chat(request, timeout=60)
    chunks = list(stub.ChatStream(request, timeout=60))
    assert unary.reasoning_text, "the thinking went missing"
    assert "<think>" not in unary.reasoning_text and "<think>" not in unary.text
    assert "".join(c.reasoning_text for c in chunks) == unary.reasoning_text
    assert "".join(c.text for c in chunks) == unary.text
    # The tiny model never closes its thinking, so no answer text follows.
    assert unary.text == ""
    admin.UnloadModel(pb.admin_pb2.UnloadModelRequest(name="thinker"), timeout=60)


LAB_SCHEMA = (
    '{"type": "object", "properties": {'
    '"flag": {"enum": ["low", "normal", "high"]}, '
    '"value": {"type": "integer", "minimum": 0, "maximum": 999}, '
    '"note": {"type": "string", "maxLength": 12}}, '
    '"required": ["flag", "value", "note"], "additionalProperties": false}'
)


def test_a_json_schema_constraint_shapes_the_answer(pb, server):
    import json

    stub = inference(pb, server)
    for seed in range(3):
        reply = stub.Generate(
            pb.inference_pb2.GenerateRequest(
                model="tiny",
                prompt="Potassium 6.1 mmol/L. As JSON:",
                sampling=pb.inference_pb2.SamplingParams(max_tokens=120, temperature=1.0, seed=seed),
                json_schema=LAB_SCHEMA,
            ),
            timeout=60,
        )
        answer = json.loads(reply.text)
        assert set(answer) == {"flag", "value", "note"}, reply.text
        assert answer["flag"] in ("low", "normal", "high")
        assert 0 <= answer["value"] <= 999
        assert reply.finish_reason == "stop"
    regex = stub.Generate(
        pb.inference_pb2.GenerateRequest(
            model="tiny", prompt="ICD-10 code:", sampling=greedy(pb, 20), regex=r"[A-Z]\d{2}\.\d"
        ),
        timeout=60,
    )
    assert len(regex.text) == 5 and regex.text[3] == ".", regex.text


def test_an_invalid_constraint_is_refused_not_ignored(pb, server):
    with pytest.raises(grpc.RpcError) as refused:
        inference(pb, server).Generate(
            pb.inference_pb2.GenerateRequest(
                model="tiny", prompt="Plan:", sampling=greedy(pb, 8), json_schema='{"type": "no-such-type"}'
            ),
            timeout=60,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "json_schema" in refused.value.details()
