//! `medbox-trainer` as a process, on the tiny model: the protocol's event
//! lines, the PEFT output, SIGTERM, and resuming after SIGKILL with the loss
//! curve of an uninterrupted run.

mod trainer;
