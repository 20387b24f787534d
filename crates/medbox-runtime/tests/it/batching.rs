//! Continuous batching: sequences join and leave a running batch without
//! changing each other's tokens; cancellation frees a slot within a step;
//! long prompts are prefilled in chunks while other streams keep flowing;
//! shared prompt prefixes are reused from the cache; a full cache makes new
//! work wait instead of failing what runs.

use std::thread;

use medbox_runtime::{
    BatchingConfig, DType, Device, Engine, EngineConfig, EngineError, FinishReason,
    GenerateRequest, GenerationEvent, GenerationStream, SamplingParams,
};

use super::{Outcome, collect, greedy, submit, tiny_model};

fn start_with(max_waiting: usize, batching: BatchingConfig) -> Engine {
    Engine::start(EngineConfig {
        name: "tiny".into(),
        path: tiny_model().to_path_buf(),
        dtype: Some(DType::F32),
        device: Device::Cpu,
        max_waiting,
        batching,
    })
    .expect("tiny model loads")
}

fn seeded(max_tokens: u32, seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: Some(seed),
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// 32 different prompts, varied in length and sampling.
fn workload() -> Vec<(String, SamplingParams)> {
    let topics = [
        "Follow-up: repeat the full blood count",
        "Discharge summary: the patient was admitted with chest pain and",
        "Lab report: potassium 5.9 mmol/L, creatinine",
        "Plan:",
    ];
    (0..32)
        .map(|index| {
            let prompt = format!("{} (case {index})", topics[index % topics.len()]);
            let max_tokens = 8 + (index as u32 * 5) % 40;
            let sampling = if index % 2 == 0 {
                greedy(max_tokens)
            } else {
                seeded(max_tokens, index as u64)
            };
            (prompt, sampling)
        })
        .collect()
}

/// Every request alone, one after another.
fn alone(engine: &Engine, work: &[(String, SamplingParams)]) -> Vec<Outcome> {
    work.iter()
        .map(|(prompt, sampling)| collect(submit(engine, prompt, sampling.clone())))
        .collect()
}

/// Every request submitted at once, collected on threads.
fn together(engine: &Engine, work: &[(String, SamplingParams)]) -> Vec<Outcome> {
    let streams: Vec<GenerationStream> = work
        .iter()
        .map(|(prompt, sampling)| submit(engine, prompt, sampling.clone()))
        .collect();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|stream| thread::spawn(move || collect(stream)))
        .collect();
    handles
        .into_iter()
        .map(|handle| handle.join().expect("collector thread"))
        .collect()
}

#[test]
fn a_batch_of_32_gives_each_request_its_tokens_alone() {
    let engine = start_with(64, BatchingConfig::default());
    let work = workload();
    let expected = alone(&engine, &work);
    let before = engine.load().steps;
    let batched = together(&engine, &work);
    let steps = engine.load().steps - before;
    for (index, (alone, batched)) in expected.iter().zip(&batched).enumerate() {
        assert_eq!(alone.token_ids, batched.token_ids, "request {index}");
        assert_eq!(alone.text, batched.text, "request {index}");
        assert_eq!(alone.reason, batched.reason, "request {index}");
    }
    let longest = work
        .iter()
        .map(|(_, sampling)| sampling.max_tokens.unwrap_or(0) as u64)
        .max()
        .unwrap_or(0);
    // Batched: about as many steps as the longest request, not the sum.
    assert!(
        steps <= longest + 4,
        "{steps} steps for 32 requests of at most {longest} tokens"
    );
}

#[test]
fn joining_and_leaving_mid_batch_leaves_outputs_unchanged() {
    let engine = start_with(8, BatchingConfig::default());
    let long = ("Discharge summary: the patient", greedy(60));
    let short = ("Plan:", greedy(5));
    let joining = ("Lab report: potassium", seeded(20, 7));
    let expected: Vec<Outcome> = [&long, &short, &joining]
        .iter()
        .map(|(prompt, sampling)| collect(submit(&engine, prompt, sampling.clone())))
        .collect();

    let mut first = submit(&engine, long.0, long.1.clone());
    let mut head = Vec::new();
    // Let the long one run a few steps alone before the others join.
    while head.len() < 5 {
        match first.blocking_next() {
            Some(GenerationEvent::Delta { token_ids, .. }) => head.extend(token_ids),
            other => panic!("unexpected {other:?}"),
        }
    }
    let second = submit(&engine, short.0, short.1.clone());
    let third = submit(&engine, joining.0, joining.1.clone());
    let short_outcome = collect(second);
    let joining_outcome = collect(third);
    let mut long_outcome = collect(first);
    head.extend(long_outcome.token_ids);
    long_outcome.token_ids = head;
    assert_eq!(long_outcome.token_ids, expected[0].token_ids);
    assert_eq!(short_outcome.token_ids, expected[1].token_ids);
    assert_eq!(joining_outcome.token_ids, expected[2].token_ids);
}

#[test]
fn cancelling_frees_the_slot_within_one_step() {
    let engine = start_with(
        4,
        BatchingConfig {
            max_running_sequences: 1,
            ..BatchingConfig::default()
        },
    );
    let mut running = submit(&engine, "Discharge summary:", greedy(400));
    assert!(matches!(
        running.blocking_next(),
        Some(GenerationEvent::Delta { .. })
    ));
    let mut queued = submit(&engine, "Plan:", greedy(3));
    while engine.load().waiting != 1 {
        thread::yield_now();
    }
    let dropped_at = engine.load().steps;
    drop(running);
    let first = queued.blocking_next();
    let answered_at = engine.load().steps;
    assert!(
        matches!(first, Some(GenerationEvent::Delta { .. })),
        "{first:?}"
    );
    // The step in flight when the stream was dropped, then the queued
    // request's own first step.
    assert!(
        answered_at - dropped_at <= 2,
        "the queued request waited {} steps",
        answered_at - dropped_at
    );
    drop(queued);
}

#[test]
fn a_full_queue_is_refused_and_named() {
    let engine = start_with(
        1,
        BatchingConfig {
            max_running_sequences: 1,
            ..BatchingConfig::default()
        },
    );
    let running = submit(&engine, "Discharge summary:", greedy(400));
    let waiting = submit(&engine, "Plan:", greedy(400));
    let request = engine
        .validate(GenerateRequest {
            prompt: "Plan:".into(),
            sampling: greedy(1),
            constraint: None,
        })
        .unwrap();
    let error = engine.submit(request).unwrap_err();
    assert_eq!(
        error,
        EngineError::QueueFull {
            model: "tiny".into(),
            max_waiting: 1
        }
    );
    drop((running, waiting));
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_other_streams_flow() {
    let batching = BatchingConfig {
        max_batch_tokens: 24,
        ..BatchingConfig::default()
    };
    let engine = start_with(4, batching);
    let long_prompt = "The patient reports chest pain, shortness of breath and nausea. ".repeat(6);
    let prompt_tokens = engine.tokenize(&long_prompt).unwrap().len();
    assert!(prompt_tokens > 100, "{prompt_tokens} tokens");
    let expected = collect(submit(&engine, &long_prompt, greedy(6)));

    let mut stream = submit(&engine, "Discharge summary:", greedy(300));
    assert!(matches!(
        stream.blocking_next(),
        Some(GenerationEvent::Delta { .. })
    ));
    let steps_before = engine.load().steps;
    let long = submit(&engine, &long_prompt, greedy(6));
    let collector = thread::spawn(move || collect(long));
    // While the long prompt is prefilled (23 tokens a step beside the
    // stream's one), the stream still gets a token every step.
    let mut flowing = 0;
    while !collector.is_finished() {
        match stream.blocking_next() {
            Some(GenerationEvent::Delta { token_ids, .. }) => flowing += token_ids.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    let outcome = collector.join().unwrap();
    let steps = engine.load().steps - steps_before;
    let chunks = prompt_tokens.div_ceil(23) as u64;
    assert!(steps >= chunks, "{steps} steps for {chunks} chunks");
    assert!(
        flowing as u64 + 2 >= chunks,
        "the stream got {flowing} tokens during {chunks} prefill chunks"
    );
    assert_eq!(outcome.token_ids, expected.token_ids, "chunked prefill");
    drop(stream);
}

#[test]
fn a_shared_prefix_is_reused_and_gives_the_same_tokens() {
    let system = "System: you are a careful clinical assistant. Answer briefly. ".repeat(4);
    let first_prompt = format!("{system}Question: what does a high potassium mean?");
    let second_prompt = format!("{system}Question: when is a repeat blood count needed?");

    // Reference: a fresh engine per prompt, so nothing can be reused.
    let fresh = |prompt: &str| {
        let engine = start_with(2, BatchingConfig::default());
        collect(submit(&engine, prompt, greedy(12)))
    };
    let expected_first = fresh(&first_prompt);
    let expected_second = fresh(&second_prompt);

    let engine = start_with(2, BatchingConfig::default());
    let first = collect(submit(&engine, &first_prompt, greedy(12)));
    assert_eq!(engine.load().reused_tokens, 0);
    let second = collect(submit(&engine, &second_prompt, greedy(12)));
    let reused = engine.load().reused_tokens;
    let shared = engine.tokenize(&system).unwrap().len() as u64;
    assert!(
        reused >= shared.saturating_sub(16) && reused > 0,
        "reused {reused} of {shared} shared tokens"
    );
    assert_eq!(first.token_ids, expected_first.token_ids);
    assert_eq!(second.token_ids, expected_second.token_ids);
    // The same prompt again reuses all but its last partial block.
    let again = collect(submit(&engine, &second_prompt, greedy(12)));
    assert_eq!(again.token_ids, expected_second.token_ids);
}

#[test]
fn a_full_cache_makes_new_work_wait_not_running_work_fail() {
    // Room for about three short sequences' worth of blocks.
    let per_token = 2 * 4 * 64 * 4; // (K+V) × layers × kv width × f32, tiny model
    let batching = BatchingConfig {
        kv_cache_bytes: Some(per_token * 16 * 12),
        ..BatchingConfig::default()
    };
    let engine = start_with(16, batching);
    let work: Vec<(String, SamplingParams)> = (0..6)
        .map(|index| (format!("Plan for case {index}:"), greedy(40)))
        .collect();
    let expected = alone(&engine, &work);
    let batched = together(&engine, &work);
    for (index, (alone, batched)) in expected.iter().zip(&batched).enumerate() {
        assert_eq!(alone.token_ids, batched.token_ids, "request {index}");
        assert_eq!(batched.reason, FinishReason::Length);
    }
    eprintln!("{:?}", engine.load());
    // Six sequences of about 48 tokens need 18 blocks; the cache has 11.
    assert!(engine.load().preemptions > 0, "the cache was not the limit");
}
