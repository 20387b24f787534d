//! Prints the synthetic lab-flag task (`medbox_finetune::synthetic`) as a
//! `messages` JSONL dataset: `lab_task SEED COUNT > lab-flags.jsonl`.
//! Used by `scripts/demo.sh` and `scripts/bench-finetune.sh`.

use anyhow::Context;
use medbox_finetune::synthetic::{lab_flag_examples, to_messages_jsonl};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args
        .next()
        .context("usage: lab_task SEED COUNT")?
        .parse()
        .context("SEED is a number")?;
    let count: usize = args
        .next()
        .context("usage: lab_task SEED COUNT")?
        .parse()
        .context("COUNT is a number")?;
    print!("{}", to_messages_jsonl(&lab_flag_examples(seed, count)));
    Ok(())
}
