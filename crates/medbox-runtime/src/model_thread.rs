//! The one way a model gets its own OS thread: the thread loads the model
//! (so its tensors are born there and never leave), hands what the callers'
//! handle needs back to `start`, then serves until its command channel closes.

use std::thread::JoinHandle;

use crate::error::LoadError;

/// Spawns `name`; on it, `load` makes the worker and what the handle needs
/// (`ready`). Blocks until the load is done: returns `ready` and the thread,
/// which goes on with `serve(worker)`, or the load's error once the thread
/// has ended. `what` names the thread kind in the panic message.
pub(crate) fn spawn_loaded<Ready, Worker>(
    name: String,
    what: &'static str,
    load: impl FnOnce() -> Result<(Ready, Worker), LoadError> + Send + 'static,
    serve: impl FnOnce(Worker) + Send + 'static,
) -> Result<(Ready, JoinHandle<()>), LoadError>
where
    Ready: Send + 'static,
{
    let (ready_sender, ready_receiver) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || match load() {
            Ok((ready, worker)) => {
                if ready_sender.send(Ok(ready)).is_ok() {
                    serve(worker);
                }
            }
            Err(error) => {
                let _caller_may_be_gone = ready_sender.send(Err(error));
            }
        })
        .map_err(|error| LoadError::Thread(error.to_string()))?;
    let ready = ready_receiver
        .recv()
        .map_err(|_| LoadError::Thread(format!("the {what} thread panicked while loading")));
    match ready {
        Ok(Ok(ready)) => Ok((ready, thread)),
        Ok(Err(error)) | Err(error) => {
            let _ = thread.join();
            Err(error)
        }
    }
}
