//! The future a publish returns.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;

use crate::{Message, Result};

/// A backend that settles a publish on the spot, without waiting on anything (the in-memory
/// backend). [`Publishing::now`] runs it when first polled, with no allocation.
pub trait PublishNow: Send + Sync {
    /// Publishes `message` to `topic` and returns the outcome.
    fn publish_now(&self, topic: &str, message: Message) -> Result<()>;
}

/// The future [`Publisher::publish`](crate::Publisher::publish) returns: either a backend's
/// own future, or, for a backend that settles publishes on the spot, the publish itself, run
/// when first polled.
///
/// Like any future it does nothing until polled. A publish settled on the spot still takes a
/// unit of the task's scheduling budget, so a loop that only publishes lets other tasks on its
/// worker run now and then (as tokio's own channels do).
#[must_use = "futures do nothing unless polled"]
pub struct Publishing<'a>(State<'a>);

enum State<'a> {
    Now {
        publisher: &'a dyn PublishNow,
        topic: &'a str,
        message: Option<Message>,
    },
    Waiting(BoxFuture<'a, Result<()>>),
}

impl<'a> Publishing<'a> {
    /// A publish `publisher` settles on the spot.
    pub fn now(publisher: &'a dyn PublishNow, topic: &'a str, message: Message) -> Self {
        Publishing(State::Now {
            publisher,
            topic,
            message: Some(message),
        })
    }

    /// A publish that waits on the backend.
    pub fn waiting(future: BoxFuture<'a, Result<()>>) -> Self {
        Publishing(State::Waiting(future))
    }
}

impl Future for Publishing<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match &mut self.get_mut().0 {
            State::Now {
                publisher,
                topic,
                message,
            } => {
                let budget = ready!(tokio::task::coop::poll_proceed(cx));
                budget.made_progress();
                let message = message.take().expect("a publish polled after it completed");
                Poll::Ready(publisher.publish_now(topic, message))
            }
            State::Waiting(future) => future.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for Publishing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.0 {
            State::Now { .. } => "now",
            State::Waiting(_) => "waiting",
        };
        f.debug_tuple("Publishing").field(&state).finish()
    }
}
