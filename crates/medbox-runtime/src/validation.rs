//! Requests and their validation. `GenerateRequest` is what callers build;
//! `ValidGenerateRequest` is the only thing an engine accepts, and only
//! `validate` makes one: the prompt is tokenized and fits the context, every
//! sampling field is in range, and unset fields carry the model's defaults
//! (`generation_config.json`, else temperature 1, top_p 1). A constraint is
//! compiled here too, so that a bad schema, regex or grammar is refused
//! before the request is queued.

use std::sync::Arc;

use crate::config::GenerationConfig;
use crate::constraint::{CompiledConstraint, Constraint, ConstraintCompiler};
use crate::error::ValidationError;
use crate::sampling::ResolvedSampling;

/// A generation request as a caller states it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub sampling: SamplingParams,
    /// What the answer must match; `None`: free text.
    pub constraint: Option<Constraint>,
}

/// Sampling fields; `None` means "the model's default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: Option<u32>,
    /// 0 means greedy.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// Generation ends before any of these; they never appear in the text.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// A checked request: prompt token ids and fully resolved sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerateRequest {
    pub(crate) prompt_tokens: Vec<u32>,
    pub(crate) max_tokens: u32,
    pub(crate) sampling: ResolvedSampling,
    pub(crate) stop: Vec<String>,
    pub(crate) ignore_eos: bool,
    /// The prompt ends inside an open `<think>` (chat only).
    pub(crate) starts_in_reasoning: bool,
    /// The answer may open `<think>` (chat with a thinking model).
    pub(crate) may_open_reasoning: bool,
    /// The request's constraint, compiled for this model.
    pub(crate) constraint: Option<CompiledConstraint>,
}

impl ValidGenerateRequest {
    /// Number of prompt tokens (special tokens included).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens.len()
    }

    /// The prompt's token ids, as the model will see them.
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_tokens
    }

    /// The number of tokens generation may produce at most.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// Whether the rendered chat prompt ends inside an open `<think>` (as
    /// DeepSeek-R1 and Qwen3 thinking templates leave it), so that the
    /// answer starts with reasoning: give it to `ReasoningSplitter::new`.
    /// Always false for plain `GenerateRequest`s.
    pub fn starts_in_reasoning(&self) -> bool {
        self.starts_in_reasoning
    }

    /// The kind of the request's constraint (`json_schema`, `regex` or
    /// `grammar`), if it has one.
    pub fn constraint_kind(&self) -> Option<&'static str> {
        self.constraint.as_ref().map(CompiledConstraint::kind)
    }
}

pub(crate) const MAX_STOP_STRINGS: usize = 16;
pub(crate) const MAX_STOP_BYTES: usize = 256;

/// The model facts validation needs.
#[derive(Debug, Clone)]
pub(crate) struct Validator {
    pub model_name: String,
    pub max_context: usize,
    pub defaults: GenerationConfig,
    /// Compiles constraints for this model; `Err` says why it cannot.
    pub constraints: Result<Arc<ConstraintCompiler>, String>,
}

impl Validator {
    pub(crate) fn validate(
        &self,
        request: GenerateRequest,
        tokenize: impl FnOnce(&str) -> Result<Vec<u32>, String>,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let GenerateRequest {
            prompt,
            sampling,
            constraint,
        } = request;
        if prompt.is_empty() {
            return Err(ValidationError::EmptyPrompt);
        }
        let resolved = self.resolve_sampling(&sampling)?;
        check_stops(&sampling.stop)?;
        let prompt_tokens = tokenize(&prompt).map_err(ValidationError::Tokenizer)?;
        if prompt_tokens.is_empty() {
            return Err(ValidationError::EmptyPrompt);
        }
        // At least one token must fit after the prompt.
        let max_prompt = self.max_context.saturating_sub(1);
        if prompt_tokens.len() > max_prompt {
            return Err(ValidationError::PromptTooLong {
                model: self.model_name.clone(),
                length: prompt_tokens.len(),
                max: max_prompt,
            });
        }
        let room = u32::try_from(self.max_context - prompt_tokens.len()).unwrap_or(u32::MAX);
        let max_tokens = match sampling.max_tokens {
            Some(max_tokens) if max_tokens == 0 || max_tokens > room => {
                return Err(ValidationError::MaxTokens {
                    max: room,
                    got: max_tokens,
                });
            }
            Some(max_tokens) => max_tokens,
            None => self
                .defaults
                .max_new_tokens
                .map_or(room, |default| default.clamp(1, room)),
        };
        // Last: compiling is the costly check.
        let constraint = constraint
            .map(|constraint| self.compile(&constraint))
            .transpose()?;
        Ok(ValidGenerateRequest {
            prompt_tokens,
            max_tokens,
            sampling: resolved,
            stop: sampling.stop,
            ignore_eos: sampling.ignore_eos,
            starts_in_reasoning: false,
            may_open_reasoning: false,
            constraint,
        })
    }

    fn compile(&self, constraint: &Constraint) -> Result<CompiledConstraint, ValidationError> {
        match &self.constraints {
            Ok(compiler) => compiler.compile(constraint),
            Err(why) => Err(ValidationError::Constraint {
                field: constraint.field(),
                reason: format!(
                    "model `{}` cannot constrain its output: {why}",
                    self.model_name
                ),
            }),
        }
    }

    fn resolve_sampling(
        &self,
        sampling: &SamplingParams,
    ) -> Result<ResolvedSampling, ValidationError> {
        let defaults = &self.defaults;
        let default_temperature = match defaults.do_sample {
            Some(false) => 0.0,
            _ => defaults.temperature.unwrap_or(1.0),
        };
        let temperature = sampling.temperature.unwrap_or(default_temperature);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ValidationError::Temperature(temperature));
        }
        let top_p = sampling.top_p.or(defaults.top_p).unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ValidationError::TopP(top_p));
        }
        let top_k = match sampling.top_k {
            Some(0) => return Err(ValidationError::TopK(0)),
            Some(top_k) => Some(top_k),
            // transformers uses top_k 0 for "no cut".
            None => defaults.top_k.filter(|&top_k| top_k > 0),
        };
        let repetition_penalty = sampling
            .repetition_penalty
            .or(defaults.repetition_penalty)
            .unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ValidationError::RepetitionPenalty(repetition_penalty));
        }
        Ok(ResolvedSampling {
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed: sampling.seed,
        })
    }
}

fn check_stops(stops: &[String]) -> Result<(), ValidationError> {
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ValidationError::TooManyStops {
            max: MAX_STOP_STRINGS,
            got: stops.len(),
        });
    }
    for (index, stop) in stops.iter().enumerate() {
        if stop.is_empty() {
            return Err(ValidationError::EmptyStop { index });
        }
        if stop.len() > MAX_STOP_BYTES {
            return Err(ValidationError::StopTooLong {
                index,
                max: MAX_STOP_BYTES,
                got: stop.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator(defaults: GenerationConfig) -> Validator {
        Validator {
            model_name: "tiny".into(),
            max_context: 10,
            defaults,
            constraints: Err("no tokenizer in this test".into()),
        }
    }

    /// One token per character.
    fn by_chars(text: &str) -> Result<Vec<u32>, String> {
        Ok(text.chars().map(u32::from).collect())
    }

    fn check_error(prompt: &str, sampling: SamplingParams, expect: &str) {
        let request = GenerateRequest {
            prompt: prompt.into(),
            sampling,
            constraint: None,
        };
        let error = validator(GenerationConfig::default())
            .validate(request, by_chars)
            .unwrap_err();
        assert_eq!(error.to_string(), expect);
    }

    #[test]
    fn error_messages_name_the_field() {
        let none = SamplingParams::default;
        check_error("", none(), "prompt must not be empty");
        check_error(
            "0123456789",
            none(),
            "prompt is 10 tokens but model `tiny` accepts at most 9",
        );
        check_error(
            "abc",
            SamplingParams {
                max_tokens: Some(0),
                ..none()
            },
            "sampling.max_tokens must be between 1 and 7 (got 0)",
        );
        check_error(
            "abc",
            SamplingParams {
                max_tokens: Some(8),
                ..none()
            },
            "sampling.max_tokens must be between 1 and 7 (got 8)",
        );
        check_error(
            "abc",
            SamplingParams {
                top_p: Some(0.0),
                ..none()
            },
            "sampling.top_p must be > 0 and ≤ 1 (got 0)",
        );
        check_error(
            "abc",
            SamplingParams {
                top_p: Some(1.5),
                ..none()
            },
            "sampling.top_p must be > 0 and ≤ 1 (got 1.5)",
        );
        check_error(
            "abc",
            SamplingParams {
                temperature: Some(-1.0),
                ..none()
            },
            "sampling.temperature must be ≥ 0 and finite (got -1)",
        );
        check_error(
            "abc",
            SamplingParams {
                top_k: Some(0),
                ..none()
            },
            "sampling.top_k must be ≥ 1 (got 0)",
        );
        check_error(
            "abc",
            SamplingParams {
                repetition_penalty: Some(0.0),
                ..none()
            },
            "sampling.repetition_penalty must be > 0 and finite (got 0)",
        );
        check_error(
            "abc",
            SamplingParams {
                stop: vec!["ok".into(), String::new()],
                ..none()
            },
            "sampling.stop[1] must not be empty",
        );
    }

    #[test]
    fn unset_fields_take_generation_config_then_fallbacks() {
        let request = |sampling| GenerateRequest {
            prompt: "abc".into(),
            sampling,
            constraint: None,
        };
        let plain = validator(GenerationConfig::default())
            .validate(request(SamplingParams::default()), by_chars)
            .unwrap();
        assert_eq!(
            (
                plain.sampling.temperature,
                plain.sampling.top_p,
                plain.sampling.top_k,
                plain.max_tokens
            ),
            (1.0, 1.0, None, 7)
        );
        let defaults = GenerationConfig {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(20),
            max_new_tokens: Some(5),
            ..GenerationConfig::default()
        };
        let with_defaults = validator(defaults.clone())
            .validate(request(SamplingParams::default()), by_chars)
            .unwrap();
        assert_eq!(
            (
                with_defaults.sampling.temperature,
                with_defaults.sampling.top_p
            ),
            (0.7, 0.9)
        );
        assert_eq!(
            (with_defaults.sampling.top_k, with_defaults.max_tokens),
            (Some(20), 5)
        );
        // An explicit 0 is greedy, not "unset".
        let greedy = validator(defaults)
            .validate(
                request(SamplingParams {
                    temperature: Some(0.0),
                    ..SamplingParams::default()
                }),
                by_chars,
            )
            .unwrap();
        assert_eq!(greedy.sampling.temperature, 0.0);
        let no_sampling = GenerationConfig {
            do_sample: Some(false),
            temperature: Some(0.6),
            ..GenerationConfig::default()
        };
        let greedy_default = validator(no_sampling)
            .validate(request(SamplingParams::default()), by_chars)
            .unwrap();
        assert_eq!(greedy_default.sampling.temperature, 0.0);
        assert_eq!(greedy_default.prompt_tokens(), 3);
    }

    #[test]
    fn every_error_has_a_kind() {
        assert_eq!(ValidationError::EmptyPrompt.kind(), "empty_prompt");
        assert_eq!(ValidationError::TopP(2.0).kind(), "top_p");
    }
}
