//! The broker: clients, caches of queue URLs and topic ARNs, background batchers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use spindle_core::{
    async_trait, with_timeout, Admin, Broker, Capabilities, Config, Error, GroupDepth, GroupPolicy,
    Message, PublishOptions, Publisher, Result, SubscribeOptions, Subscriber, Subscription,
};

use crate::batch::{Batcher, FlushFn, Limits};
use crate::codec::{self, Encoded};
use crate::consumer::{self, SubInner};
use crate::error::{entry_error, map_sdk, replicate};
use crate::settings::{Mode, Settings};
use crate::BACKEND;

const GROUP_TAG: &str = "spindle-group";
const MAX_PUBLISH_DELAY: Duration = Duration::from_secs(15 * 60);
pub(crate) const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
const ROUTABLE_TTL: Duration = Duration::from_secs(5);

/// Counts every HTTP request the SDK clients send (retries included).
#[derive(Debug, Clone, Default)]
struct RequestCounter(Arc<AtomicU64>);

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "spindle-request-counter"
    }
    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Where a group's messages live.
#[derive(Debug, Clone)]
pub(crate) struct GroupInfo {
    pub queue_url: Arc<str>,
    pub dlq_url: Arc<str>,
    pub max_attempts: u32,
    pub fifo: bool,
}

struct TopicEntry {
    arn: Arc<str>,
    routable_at: Option<Instant>,
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub sqs: aws_sdk_sqs::Client,
    sns: Option<aws_sdk_sns::Client>,
    /// `arn:<partition>:sns:<region>:<account>:` in fan-out mode.
    arn_prefix: String,
    requests: Arc<AtomicU64>,
    pub sqs_pub: Batcher<Encoded>,
    sns_pub: Batcher<Encoded>,
    pub deletes: Batcher<String>,
    pub visibility: Batcher<(String, i32)>,
    publish_closed: AtomicBool,
    pub shut: AtomicBool,
    urls: Mutex<HashMap<String, Arc<str>>>,
    topics: Mutex<HashMap<String, TopicEntry>>,
    groups: Mutex<HashMap<(String, String), GroupInfo>>,
    subs: Mutex<Vec<Weak<SubInner>>>,
}

/// A connection to SQS (and SNS in fan-out mode). Implements [`spindle_core::Broker`].
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct SqsBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsBroker")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

pub(crate) fn ceil_secs(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.min(i32::MAX as u64) as i32
}

fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data type is set")
}

fn sqs_send_flush(client: aws_sdk_sqs::Client) -> FlushFn<Encoded> {
    Arc::new(move |url: Arc<str>, items: Vec<Encoded>| {
        let client = client.clone();
        Box::pin(async move {
            let n = items.len();
            let entries: Vec<SendMessageBatchRequestEntry> = items
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let attrs = e
                        .attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), string_attr(v)))
                        .collect();
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(e.body)
                        .set_message_attributes(Some(attrs))
                        .set_delay_seconds(e.delay_secs)
                        .set_message_group_id(e.group_id)
                        .set_message_deduplication_id(e.dedup_id)
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let result = client
                .send_message_batch()
                .queue_url(&*url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_sdk("SendMessageBatch", &format!("queue {url}"), e));
            batch_results(
                "SendMessageBatch",
                n,
                result.as_ref().map(|out| {
                    let failed = out.failed().iter();
                    (
                        out.successful().iter().map(|e| Some(e.id())),
                        failed.map(|f| (f.id(), f.code(), f.message(), f.sender_fault())),
                    )
                }),
            )
        })
    })
}

/// One result per entry of a batch whose entry ids are their indexes: the request's error for
/// every entry if the request failed; else `Ok` for the successful ones, the entry's own error
/// for the failed ones, and a transient error for any the answer does not mention.
fn batch_results<'a, S, F>(
    operation: &'static str,
    n: usize,
    outcome: std::result::Result<(S, F), &Error>,
) -> Vec<Result<()>>
where
    S: IntoIterator<Item = Option<&'a str>>,
    F: IntoIterator<Item = (&'a str, &'a str, Option<&'a str>, bool)>,
{
    let (successful, failed) = match outcome {
        Ok(parts) => parts,
        // The request itself failed: every entry gets its error.
        Err(err) => return (0..n).map(|_| Err(replicate(err))).collect(),
    };
    let mut results: Vec<Option<Result<()>>> = (0..n).map(|_| None).collect();
    for id in successful.into_iter().flatten() {
        if let Some(r) = id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
            *r = Some(Ok(()));
        }
    }
    for (id, code, message, sender_fault) in failed {
        if let Some(r) = id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
            *r = Some(Err(entry_error(operation, code, message, sender_fault)));
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Error::backend(
                    BACKEND,
                    format!("{operation}: no result for entry"),
                    true,
                    None,
                ))
            })
        })
        .collect()
}

fn sns_publish_flush(client: aws_sdk_sns::Client) -> FlushFn<Encoded> {
    use aws_sdk_sns::types::{MessageAttributeValue as SnsAttr, PublishBatchRequestEntry};
    Arc::new(move |arn: Arc<str>, items: Vec<Encoded>| {
        let client = client.clone();
        Box::pin(async move {
            let n = items.len();
            let entries: Vec<PublishBatchRequestEntry> = items
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let attrs = e
                        .attributes
                        .iter()
                        .map(|(k, v)| {
                            let a = SnsAttr::builder()
                                .data_type("String")
                                .string_value(v)
                                .build()
                                .expect("data type is set");
                            (k.clone(), a)
                        })
                        .collect();
                    PublishBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message(e.body)
                        .set_message_attributes(Some(attrs))
                        .set_message_group_id(e.group_id)
                        .set_message_deduplication_id(e.dedup_id)
                        .build()
                        .expect("id and message are set")
                })
                .collect();
            let result = client
                .publish_batch()
                .topic_arn(&*arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_sdk("PublishBatch", &format!("topic {arn}"), e));
            batch_results(
                "PublishBatch",
                n,
                result.as_ref().map(|out| {
                    let failed = out.failed().iter();
                    (
                        out.successful().iter().map(|e| e.id()),
                        failed.map(|f| (f.id(), f.code(), f.message(), f.sender_fault())),
                    )
                }),
            )
        })
    })
}

fn delete_flush(client: aws_sdk_sqs::Client) -> FlushFn<String> {
    Arc::new(move |url: Arc<str>, items: Vec<String>| {
        let client = client.clone();
        Box::pin(async move {
            let n = items.len();
            let entries: Vec<_> = items
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .expect("fields set")
                })
                .collect();
            let result = client
                .delete_message_batch()
                .queue_url(&*url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_sdk("DeleteMessageBatch", &format!("queue {url}"), e));
            batch_results(
                "DeleteMessageBatch",
                n,
                result.as_ref().map(|out| {
                    let failed = out.failed().iter();
                    (
                        out.successful().iter().map(|e| Some(e.id())),
                        failed.map(|f| (f.id(), f.code(), f.message(), f.sender_fault())),
                    )
                }),
            )
        })
    })
}

fn visibility_flush(client: aws_sdk_sqs::Client) -> FlushFn<(String, i32)> {
    Arc::new(move |url: Arc<str>, items: Vec<(String, i32)>| {
        let client = client.clone();
        Box::pin(async move {
            let n = items.len();
            let entries: Vec<_> = items
                .into_iter()
                .enumerate()
                .map(|(i, (r, secs))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(secs)
                        .build()
                        .expect("fields set")
                })
                .collect();
            let result = client
                .change_message_visibility_batch()
                .queue_url(&*url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_sdk("ChangeMessageVisibilityBatch", &format!("queue {url}"), e));
            batch_results(
                "ChangeMessageVisibilityBatch",
                n,
                result.as_ref().map(|out| {
                    let failed = out.failed().iter();
                    (
                        out.successful().iter().map(|e| Some(e.id())),
                        failed.map(|f| (f.id(), f.code(), f.message(), f.sender_fault())),
                    )
                }),
            )
        })
    })
}

impl SqsBroker {
    /// Connects as `config` says and probes the endpoint; see the crate docs for options.
    pub async fn connect(config: &Config) -> Result<Self> {
        let settings = Settings::from_config(config)?;
        let bound = settings.timeout + settings.connect_timeout;
        with_timeout("sqs connect", bound, Self::connect_with(settings)).await
    }

    async fn connect_with(settings: Settings) -> Result<Self> {
        crate::error::set_configured_timeout(settings.timeout);
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .operation_attempt_timeout(settings.timeout)
            .operation_timeout(settings.timeout)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts);
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                settings.session_token.clone(),
                None,
                "spindle-sqs-options",
            ));
        }
        let sdk = loader.load().await;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(Error::InvalidConfig(
                "sqs: no region: set the `region` option or AWS_REGION".into(),
            ));
        };
        let counter = RequestCounter::default();
        let requests = counter.0.clone();
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&sdk)
                .interceptor(counter.clone())
                .build(),
        );
        let (sns, arn_prefix) = match settings.mode {
            Mode::Queue => {
                sqs.list_queues()
                    .max_results(1)
                    .send()
                    .await
                    .map_err(|e| map_sdk("ListQueues", "the SQS endpoint", e))?;
                (None, String::new())
            }
            Mode::FanOut => {
                let sts = aws_sdk_sts::Client::from_conf(
                    aws_sdk_sts::config::Builder::from(&sdk)
                        .interceptor(counter.clone())
                        .build(),
                );
                let me = sts
                    .get_caller_identity()
                    .send()
                    .await
                    .map_err(|e| map_sdk("GetCallerIdentity", "the STS endpoint", e))?;
                let account = me.account().unwrap_or("000000000000").to_string();
                let partition = me
                    .arn()
                    .and_then(|a| a.split(':').nth(1))
                    .unwrap_or("aws")
                    .to_string();
                let sns = aws_sdk_sns::Client::from_conf(
                    aws_sdk_sns::config::Builder::from(&sdk)
                        .interceptor(counter.clone())
                        .build(),
                );
                (
                    Some(sns),
                    format!("arn:{partition}:sns:{region}:{account}:"),
                )
            }
        };
        let pub_limits = |max_bytes| Limits {
            linger: settings.publish_linger,
            max_items: 10,
            max_bytes,
            max_in_flight: 8,
        };
        let ack_limits = Limits {
            linger: settings.ack_linger,
            max_items: 10,
            max_bytes: usize::MAX,
            max_in_flight: 8,
        };
        let sns_flush = match &sns {
            Some(client) => sns_publish_flush(client.clone()),
            None => Arc::new(|_: Arc<str>, items: Vec<Encoded>| {
                Box::pin(async move {
                    items
                        .iter()
                        .map(|_| Err(Error::unsupported(BACKEND, "SNS in queue mode")))
                        .collect()
                }) as futures::future::BoxFuture<'static, Vec<Result<()>>>
            }),
        };
        let inner = Inner {
            sqs_pub: Batcher::new(
                "sqs publisher",
                pub_limits(codec::SQS_MAX_MESSAGE_BYTES),
                sqs_send_flush(sqs.clone()),
            ),
            sns_pub: Batcher::new(
                "sns publisher",
                pub_limits(codec::SNS_MAX_MESSAGE_BYTES),
                sns_flush,
            ),
            deletes: Batcher::new("sqs acks", ack_limits, delete_flush(sqs.clone())),
            visibility: Batcher::new("sqs nacks", ack_limits, visibility_flush(sqs.clone())),
            settings,
            sqs,
            sns,
            arn_prefix,
            requests,
            publish_closed: AtomicBool::new(false),
            shut: AtomicBool::new(false),
            urls: Mutex::new(HashMap::new()),
            topics: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            subs: Mutex::new(Vec::new()),
        };
        Ok(SqsBroker {
            inner: Arc::new(inner),
        })
    }

    /// The mode this broker runs in.
    pub fn mode(&self) -> Mode {
        self.inner.settings.mode
    }

    /// How many HTTP requests this broker's SDK clients have sent so far (retries included):
    /// for measuring requests per message.
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    fn caps(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.nack_delay = true;
        c.max_nack_delay = Some(MAX_VISIBILITY);
        c.native_dead_letter = true;
        c.extend = true;
        c.ack_deadline = true;
        c.max_batch = 10;
        c.depth = true;
        c.purge = true;
        c.redrive = true;
        match self.inner.settings.mode {
            Mode::Queue => {
                c.delayed_publish = true;
                c.max_publish_delay = Some(MAX_PUBLISH_DELAY);
                c.max_payload_bytes = codec::max_payload_for(codec::SQS_MAX_MESSAGE_BYTES);
                c.replay = true;
            }
            Mode::FanOut => {
                c.fan_out = true;
                c.max_payload_bytes = codec::max_payload_for(codec::SNS_MAX_MESSAGE_BYTES);
                c.rejects_unroutable = true;
            }
        }
        c
    }
}

fn is_fifo(topic: &str) -> bool {
    topic.ends_with(".fifo")
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.shut.load(Ordering::SeqCst) {
            return Err(Error::Closed("broker is shut down"));
        }
        Ok(())
    }

    pub(crate) fn max_payload(&self) -> usize {
        match self.settings.mode {
            Mode::Queue => codec::max_payload_for(codec::SQS_MAX_MESSAGE_BYTES),
            Mode::FanOut => codec::max_payload_for(codec::SNS_MAX_MESSAGE_BYTES),
        }
    }

    /// The URL of an existing queue; `what` names it in `NotFound`.
    async fn queue_url(&self, name: &str, what: &str) -> Result<Arc<str>> {
        if let Some(url) = self.urls.lock().unwrap().get(name) {
            return Ok(url.clone());
        }
        let out = self
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| map_sdk("GetQueueUrl", what, e))?;
        let url: Arc<str> = out
            .queue_url()
            .ok_or_else(|| Error::not_found(what.to_string()))?
            .into();
        self.urls
            .lock()
            .unwrap()
            .insert(name.to_string(), url.clone());
        Ok(url)
    }

    async fn create_queue(&self, name: &str, fifo: bool) -> Result<Arc<str>> {
        let mut req = self.sqs.create_queue().queue_name(name);
        if fifo {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let out = req
            .send()
            .await
            .map_err(|e| map_sdk("CreateQueue", &format!("queue `{name}`"), e))?;
        let url: Arc<str> = out
            .queue_url()
            .ok_or_else(|| Error::backend(BACKEND, "CreateQueue returned no URL", true, None))?
            .into();
        self.urls
            .lock()
            .unwrap()
            .insert(name.to_string(), url.clone());
        Ok(url)
    }

    async fn queue_attributes(
        &self,
        url: &str,
        names: &[QueueAttributeName],
    ) -> Result<HashMap<QueueAttributeName, String>> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| map_sdk("GetQueueAttributes", &format!("queue {url}"), e))?;
        Ok(out.attributes().cloned().unwrap_or_default())
    }

    async fn queue_arn(&self, url: &str) -> Result<String> {
        self.queue_attributes(url, &[QueueAttributeName::QueueArn])
            .await?
            .remove(&QueueAttributeName::QueueArn)
            .ok_or_else(|| Error::backend(BACKEND, "queue has no ARN", true, None))
    }

    /// Creates the dead-letter queue and points the group queue's redrive policy at it.
    async fn apply_policy(
        &self,
        queue_url: &str,
        dlq_name: &str,
        fifo: bool,
        policy: &GroupPolicy,
    ) -> Result<Arc<str>> {
        let dlq_url = self.create_queue(dlq_name, fifo).await?;
        let dlq_arn = self.queue_arn(&dlq_url).await?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": policy.max_attempts.to_string(),
        })
        .to_string();
        self.sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .send()
            .await
            .map_err(|e| map_sdk("SetQueueAttributes", &format!("queue {queue_url}"), e))?;
        Ok(dlq_url)
    }

    /// Reads an existing group queue's redrive policy.
    async fn existing_group(
        &self,
        queue_url: Arc<str>,
        fifo: bool,
        what: &str,
    ) -> Result<Option<GroupInfo>> {
        let mut attrs = self
            .queue_attributes(&queue_url, &[QueueAttributeName::RedrivePolicy])
            .await?;
        let Some(policy) = attrs.remove(&QueueAttributeName::RedrivePolicy) else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_str(&policy).map_err(|e| {
            Error::backend(
                BACKEND,
                format!("{what}: unreadable redrive policy: {e}"),
                false,
                None,
            )
        })?;
        let arn = json["deadLetterTargetArn"].as_str().unwrap_or_default();
        let max_attempts = match &json["maxReceiveCount"] {
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(1) as u32,
            serde_json::Value::String(s) => s.parse().unwrap_or(1),
            _ => 1,
        };
        let dlq_name = arn.rsplit(':').next().unwrap_or_default();
        let dlq_url = self.queue_url(dlq_name, what).await?;
        Ok(Some(GroupInfo {
            queue_url,
            dlq_url,
            max_attempts,
            fifo,
        }))
    }

    fn cached_group(&self, topic: &str, group: &str) -> Option<GroupInfo> {
        self.groups
            .lock()
            .unwrap()
            .get(&(topic.to_string(), group.to_string()))
            .cloned()
    }

    fn cache_group(&self, topic: &str, group: &str, info: &GroupInfo) {
        self.groups
            .lock()
            .unwrap()
            .insert((topic.to_string(), group.to_string()), info.clone());
    }

    /// The ARN of an existing SNS topic.
    async fn topic_arn(&self, topic: &str) -> Result<Arc<str>> {
        if let Some(t) = self.topics.lock().unwrap().get(topic) {
            return Ok(t.arn.clone());
        }
        let arn: Arc<str> = format!("{}{topic}", self.arn_prefix).into();
        self.sns()
            .get_topic_attributes()
            .topic_arn(&*arn)
            .send()
            .await
            .map_err(|e| map_sdk("GetTopicAttributes", &format!("topic `{topic}`"), e))?;
        self.topics.lock().unwrap().insert(
            topic.to_string(),
            TopicEntry {
                arn: arn.clone(),
                routable_at: None,
            },
        );
        Ok(arn)
    }

    fn sns(&self) -> &aws_sdk_sns::Client {
        self.sns
            .as_ref()
            .expect("SNS client exists in fan-out mode")
    }

    fn mark_routable(&self, topic: &str) {
        if let Some(t) = self.topics.lock().unwrap().get_mut(topic) {
            t.routable_at = Some(Instant::now());
        }
    }

    /// Fan-out: whether the topic has at least one subscribed group (cached briefly).
    async fn check_routable(&self, topic: &str, arn: &str) -> Result<()> {
        let fresh = self
            .topics
            .lock()
            .unwrap()
            .get(topic)
            .and_then(|t| t.routable_at)
            .is_some_and(|at| at.elapsed() < ROUTABLE_TTL);
        if fresh {
            return Ok(());
        }
        let out = self
            .sns()
            .list_subscriptions_by_topic()
            .topic_arn(arn)
            .send()
            .await
            .map_err(|e| map_sdk("ListSubscriptionsByTopic", &format!("topic `{topic}`"), e))?;
        if out.subscriptions().is_empty() {
            return Err(Error::Unroutable {
                topic: topic.to_string(),
            });
        }
        self.mark_routable(topic);
        Ok(())
    }

    fn group_queue_names(&self, topic: &str, group: &str) -> (String, String) {
        let fifo = is_fifo(topic);
        match self.settings.mode {
            Mode::Queue => (
                codec::queue_name(&[topic], "", fifo),
                codec::queue_name(&[topic], "__dlq", fifo),
            ),
            Mode::FanOut => (
                codec::queue_name(&[topic, group], "", fifo),
                codec::queue_name(&[topic, group], "__dlq", fifo),
            ),
        }
    }

    /// Finds the group, creating it with `create` when it does not exist (or `NotFound`).
    pub(crate) async fn resolve_group(
        &self,
        topic: &str,
        group: &str,
        create: Option<&GroupPolicy>,
    ) -> Result<GroupInfo> {
        codec::check_name("topic", topic)?;
        codec::check_name("group", group)?;
        if let Some(info) = self.cached_group(topic, group) {
            return Ok(info);
        }
        let fifo = is_fifo(topic);
        let (qname, dlq_name) = self.group_queue_names(topic, group);
        let group_what = format!("group `{group}` of topic `{topic}`");
        let info = match self.settings.mode {
            Mode::Queue => {
                let url = self.queue_url(&qname, &format!("topic `{topic}`")).await?;
                let owner = self.queue_owner(&url).await?;
                match owner.as_deref() {
                    Some(g) if g != group => {
                        return Err(Error::unsupported(
                            BACKEND,
                            "a second group on a topic in queue mode (use mode=fanout)",
                        ))
                    }
                    Some(_) => match self.existing_group(url.clone(), fifo, &group_what).await? {
                        Some(info) => info,
                        None => {
                            let policy = create.cloned().unwrap_or_default();
                            self.setup_queue_group(url, &dlq_name, fifo, group, &policy)
                                .await?
                        }
                    },
                    None => match create {
                        Some(policy) => {
                            self.setup_queue_group(url, &dlq_name, fifo, group, policy)
                                .await?
                        }
                        None => return Err(Error::not_found(group_what)),
                    },
                }
            }
            Mode::FanOut => {
                self.topic_arn(topic).await?;
                match self.queue_url(&qname, &group_what).await {
                    Ok(url) => match self.existing_group(url.clone(), fifo, &group_what).await? {
                        Some(info) => info,
                        None => {
                            let policy = create.cloned().unwrap_or_default();
                            self.setup_fanout_group(topic, group, &policy).await?
                        }
                    },
                    Err(Error::NotFound { .. }) => match create {
                        Some(policy) => self.setup_fanout_group(topic, group, policy).await?,
                        None => return Err(Error::not_found(group_what)),
                    },
                    Err(e) => return Err(e),
                }
            }
        };
        self.cache_group(topic, group, &info);
        Ok(info)
    }

    async fn queue_owner(&self, url: &str) -> Result<Option<String>> {
        let out = self
            .sqs
            .list_queue_tags()
            .queue_url(url)
            .send()
            .await
            .map_err(|e| map_sdk("ListQueueTags", &format!("queue {url}"), e))?;
        Ok(out.tags().and_then(|t| t.get(GROUP_TAG)).cloned())
    }

    async fn setup_queue_group(
        &self,
        url: Arc<str>,
        dlq_name: &str,
        fifo: bool,
        group: &str,
        policy: &GroupPolicy,
    ) -> Result<GroupInfo> {
        let dlq_url = self.apply_policy(&url, dlq_name, fifo, policy).await?;
        self.sqs
            .tag_queue()
            .queue_url(&*url)
            .tags(GROUP_TAG, group)
            .send()
            .await
            .map_err(|e| map_sdk("TagQueue", &format!("queue {url}"), e))?;
        Ok(GroupInfo {
            queue_url: url,
            dlq_url,
            max_attempts: policy.max_attempts,
            fifo,
        })
    }

    async fn setup_fanout_group(
        &self,
        topic: &str,
        group: &str,
        policy: &GroupPolicy,
    ) -> Result<GroupInfo> {
        let fifo = is_fifo(topic);
        let arn = self.topic_arn(topic).await?;
        let (qname, dlq_name) = self.group_queue_names(topic, group);
        let url = self.create_queue(&qname, fifo).await?;
        let dlq_url = self.apply_policy(&url, &dlq_name, fifo, policy).await?;
        let queue_arn = self.queue_arn(&url).await?;
        let access = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "spindle-sns",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": &*arn}}
            }]
        })
        .to_string();
        self.sqs
            .set_queue_attributes()
            .queue_url(&*url)
            .attributes(QueueAttributeName::Policy, access)
            .send()
            .await
            .map_err(|e| map_sdk("SetQueueAttributes", &format!("queue {url}"), e))?;
        self.sns()
            .subscribe()
            .topic_arn(&*arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| map_sdk("Subscribe", &format!("topic `{topic}`"), e))?;
        self.mark_routable(topic);
        Ok(GroupInfo {
            queue_url: url,
            dlq_url,
            max_attempts: policy.max_attempts,
            fifo,
        })
    }

    /// Sends an encoded message straight to a queue (dead-lettering, redrive).
    pub(crate) async fn send_to_queue(
        &self,
        url: Arc<str>,
        message: &Message,
        fifo: bool,
    ) -> Result<()> {
        let enc = codec::encode(
            message,
            usize::MAX,
            codec::SQS_MAX_MESSAGE_BYTES,
            fifo,
            None,
        )?;
        let size = enc.size;
        self.sqs_pub.submit(url, enc, size).await
    }

    pub(crate) fn register(&self, sub: &Arc<SubInner>) {
        let mut subs = self.subs.lock().unwrap();
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(sub));
    }
}

#[async_trait]
impl Publisher for SqsBroker {
    async fn publish_with(
        &self,
        topic: &str,
        message: Message,
        options: &PublishOptions,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        if inner.publish_closed.load(Ordering::SeqCst) {
            return Err(Error::Closed("publisher is closed"));
        }
        codec::check_name("topic", topic)?;
        let fifo = is_fifo(topic);
        let delay = match options.delay {
            Some(d) if !d.is_zero() => {
                if inner.settings.mode == Mode::FanOut {
                    return Err(Error::unsupported(
                        BACKEND,
                        "delayed publish in fan-out mode",
                    ));
                }
                if fifo {
                    return Err(Error::unsupported(
                        BACKEND,
                        "delayed publish to a FIFO queue",
                    ));
                }
                if d > MAX_PUBLISH_DELAY {
                    return Err(Error::DelayTooLong {
                        requested: d,
                        max: MAX_PUBLISH_DELAY,
                    });
                }
                Some(ceil_secs(d))
            }
            _ => None,
        };
        match inner.settings.mode {
            Mode::Queue => {
                let enc = codec::encode(
                    &message,
                    inner.max_payload(),
                    codec::SQS_MAX_MESSAGE_BYTES,
                    fifo,
                    delay,
                )?;
                let url = inner
                    .queue_url(
                        &codec::queue_name(&[topic], "", fifo),
                        &format!("topic `{topic}`"),
                    )
                    .await?;
                let size = enc.size;
                inner.sqs_pub.submit(url, enc, size).await
            }
            Mode::FanOut => {
                let enc = codec::encode(
                    &message,
                    inner.max_payload(),
                    codec::SNS_MAX_MESSAGE_BYTES,
                    fifo,
                    None,
                )?;
                let arn = inner.topic_arn(topic).await?;
                inner.check_routable(topic, &arn).await?;
                let size = enc.size;
                inner.sns_pub.submit(arn, enc, size).await
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        self.inner.sqs_pub.flush().await;
        self.inner.sns_pub.flush().await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.inner.publish_closed.store(true, Ordering::SeqCst);
        self.flush().await
    }
}

#[async_trait]
impl Subscriber for SqsBroker {
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.inner.check_open()?;
        options.validate()?;
        let info = self
            .inner
            .resolve_group(topic, group, Some(&options.policy))
            .await?;
        self.inner.check_open()?;
        Ok(consumer::start(
            self.inner.clone(),
            topic,
            group,
            info.queue_url.clone(),
            Some((info.dlq_url.clone(), info.max_attempts)),
            None,
            &options,
        ))
    }

    async fn subscribe_dead_letters(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.inner.check_open()?;
        options.validate()?;
        let info = self.inner.resolve_group(topic, group, None).await?;
        Ok(consumer::start(
            self.inner.clone(),
            topic,
            group,
            info.dlq_url.clone(),
            None,
            Some(info.max_attempts),
            &options,
        ))
    }
}

#[async_trait]
impl Admin for SqsBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        codec::check_name("topic", topic)?;
        let fifo = is_fifo(topic);
        match inner.settings.mode {
            Mode::Queue => {
                inner
                    .create_queue(&codec::queue_name(&[topic], "", fifo), fifo)
                    .await?;
            }
            Mode::FanOut => {
                let mut req = inner.sns().create_topic().name(topic);
                if fifo {
                    req = req.attributes("FifoTopic", "true");
                }
                let out = req
                    .send()
                    .await
                    .map_err(|e| map_sdk("CreateTopic", &format!("topic `{topic}`"), e))?;
                let arn: Arc<str> = out.topic_arn().unwrap_or_default().into();
                inner
                    .topics
                    .lock()
                    .unwrap()
                    .entry(topic.to_string())
                    .or_insert(TopicEntry {
                        arn,
                        routable_at: None,
                    });
            }
        }
        Ok(())
    }

    async fn ensure_group(&self, topic: &str, group: &str, policy: &GroupPolicy) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        policy.validate()?;
        codec::check_name("topic", topic)?;
        codec::check_name("group", group)?;
        let fifo = is_fifo(topic);
        let (qname, dlq_name) = inner.group_queue_names(topic, group);
        let info = match inner.settings.mode {
            Mode::Queue => {
                let url = inner.queue_url(&qname, &format!("topic `{topic}`")).await?;
                match inner.queue_owner(&url).await? {
                    Some(owner) if owner != group => {
                        tracing::warn!(
                            topic,
                            group,
                            owner = owner.as_str(),
                            "queue mode: the topic's queue already belongs to another group; \
                             subscribing this group will be Unsupported"
                        );
                        return Ok(());
                    }
                    _ => {
                        inner
                            .setup_queue_group(url, &dlq_name, fifo, group, policy)
                            .await?
                    }
                }
            }
            Mode::FanOut => inner.setup_fanout_group(topic, group, policy).await?,
        };
        inner.cache_group(topic, group, &info);
        Ok(())
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<GroupDepth> {
        use QueueAttributeName as A;
        let inner = &self.inner;
        inner.check_open()?;
        let info = inner.resolve_group(topic, group, None).await?;
        let names = [
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
            A::ApproximateNumberOfMessagesDelayed,
        ];
        let (main, dlq) = futures::try_join!(
            inner.queue_attributes(&info.queue_url, &names),
            inner.queue_attributes(&info.dlq_url, &names)
        )?;
        let get = |m: &HashMap<A, String>, a: &A| {
            m.get(a).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        Ok(GroupDepth::new(
            get(&main, &names[0]),
            get(&main, &names[1]),
            get(&main, &names[2]),
            names.iter().map(|a| get(&dlq, a)).sum(),
        ))
    }

    async fn purge(&self, topic: &str, group: &str) -> Result<u64> {
        let inner = &self.inner;
        let before = self.depth(topic, group).await?;
        let info = inner.resolve_group(topic, group, None).await?;
        inner
            .sqs
            .purge_queue()
            .queue_url(&*info.queue_url)
            .send()
            .await
            .map_err(|e| {
                map_sdk(
                    "PurgeQueue",
                    &format!("group `{group}` of topic `{topic}`"),
                    e,
                )
            })?;
        Ok(before.ready + before.delayed)
    }

    async fn redrive(&self, topic: &str, group: &str) -> Result<u64> {
        let inner = &self.inner;
        inner.check_open()?;
        let info = inner.resolve_group(topic, group, None).await?;
        let mut moved = 0u64;
        let mut empty_rounds = 0;
        while empty_rounds < 2 {
            let out = inner
                .sqs
                .receive_message()
                .queue_url(&*info.dlq_url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .visibility_timeout(30)
                .message_attribute_names("All")
                .send()
                .await
                .map_err(|e| map_sdk("ReceiveMessage", &format!("dead letters of `{group}`"), e))?;
            if out.messages().is_empty() {
                empty_rounds += 1;
                continue;
            }
            empty_rounds = 0;
            let moves = out.messages().iter().map(|m| {
                let inner = inner.clone();
                let info = info.clone();
                let mut message = consumer::decode_sqs(m);
                let receipt = m.receipt_handle().unwrap_or_default().to_string();
                async move {
                    let h = message.headers_mut();
                    h.remove(spindle_core::HEADER_DEAD_LETTER_REASON);
                    h.remove(spindle_core::HEADER_ATTEMPT);
                    h.remove(spindle_core::HEADER_ORIGINAL_TOPIC);
                    inner
                        .send_to_queue(info.queue_url.clone(), &message, info.fifo)
                        .await?;
                    inner.deletes.submit(info.dlq_url.clone(), receipt, 0).await
                }
            });
            for r in futures::future::join_all(moves).await {
                r?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        let info = inner.resolve_group(topic, group, None).await?;
        inner
            .groups
            .lock()
            .unwrap()
            .remove(&(topic.to_string(), group.to_string()));
        let del = |url: Arc<str>| async move {
            inner
                .sqs
                .delete_queue()
                .queue_url(&*url)
                .send()
                .await
                .map_err(|e| map_sdk("DeleteQueue", &format!("queue {url}"), e))
        };
        match inner.settings.mode {
            Mode::Queue => {
                inner
                    .sqs
                    .untag_queue()
                    .queue_url(&*info.queue_url)
                    .tag_keys(GROUP_TAG)
                    .send()
                    .await
                    .map_err(|e| map_sdk("UntagQueue", &format!("queue {}", info.queue_url), e))?;
                inner
                    .sqs
                    .set_queue_attributes()
                    .queue_url(&*info.queue_url)
                    .attributes(QueueAttributeName::RedrivePolicy, "")
                    .send()
                    .await
                    .map_err(|e| {
                        map_sdk(
                            "SetQueueAttributes",
                            &format!("queue {}", info.queue_url),
                            e,
                        )
                    })?;
            }
            Mode::FanOut => {
                let arn = inner.topic_arn(topic).await?;
                let queue_arn = inner.queue_arn(&info.queue_url).await?;
                let subs = inner
                    .sns()
                    .list_subscriptions_by_topic()
                    .topic_arn(&*arn)
                    .send()
                    .await
                    .map_err(|e| {
                        map_sdk("ListSubscriptionsByTopic", &format!("topic `{topic}`"), e)
                    })?;
                for s in subs.subscriptions() {
                    if s.endpoint() == Some(queue_arn.as_str()) {
                        if let Some(sub_arn) = s.subscription_arn() {
                            inner
                                .sns()
                                .unsubscribe()
                                .subscription_arn(sub_arn)
                                .send()
                                .await
                                .map_err(|e| {
                                    map_sdk("Unsubscribe", &format!("topic `{topic}`"), e)
                                })?;
                        }
                    }
                }
                if let Some(t) = inner.topics.lock().unwrap().get_mut(topic) {
                    t.routable_at = None;
                }
                del(info.queue_url.clone()).await?;
            }
        }
        del(info.dlq_url.clone()).await?;
        inner
            .urls
            .lock()
            .unwrap()
            .retain(|_, u| *u != info.queue_url && *u != info.dlq_url);
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        codec::check_name("topic", topic)?;
        let fifo = is_fifo(topic);
        match inner.settings.mode {
            Mode::Queue => {
                let url = inner
                    .queue_url(
                        &codec::queue_name(&[topic], "", fifo),
                        &format!("topic `{topic}`"),
                    )
                    .await?;
                if let Ok(dlq) = inner
                    .queue_url(
                        &codec::queue_name(&[topic], "__dlq", fifo),
                        "dead-letter queue",
                    )
                    .await
                {
                    let _ = inner.sqs.delete_queue().queue_url(&*dlq).send().await;
                }
                inner
                    .sqs
                    .delete_queue()
                    .queue_url(&*url)
                    .send()
                    .await
                    .map_err(|e| map_sdk("DeleteQueue", &format!("topic `{topic}`"), e))?;
            }
            Mode::FanOut => {
                let arn = inner.topic_arn(topic).await?;
                let subs = inner
                    .sns()
                    .list_subscriptions_by_topic()
                    .topic_arn(&*arn)
                    .send()
                    .await
                    .map_err(|e| {
                        map_sdk("ListSubscriptionsByTopic", &format!("topic `{topic}`"), e)
                    })?;
                let groups: Vec<String> = inner
                    .groups
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|(t, _)| t == topic)
                    .map(|(_, g)| g.clone())
                    .collect();
                for g in groups {
                    let _ = self.delete_group(topic, &g).await;
                }
                for s in subs.subscriptions() {
                    if let Some(sub_arn) = s.subscription_arn() {
                        let _ = inner
                            .sns()
                            .unsubscribe()
                            .subscription_arn(sub_arn)
                            .send()
                            .await;
                    }
                }
                inner
                    .sns()
                    .delete_topic()
                    .topic_arn(&*arn)
                    .send()
                    .await
                    .map_err(|e| map_sdk("DeleteTopic", &format!("topic `{topic}`"), e))?;
                inner.topics.lock().unwrap().remove(topic);
            }
        }
        inner.groups.lock().unwrap().retain(|(t, _), _| t != topic);
        inner.urls.lock().unwrap().clear();
        Ok(())
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        self.caps()
    }

    async fn shutdown(&self) -> Result<()> {
        let inner = &self.inner;
        inner.publish_closed.store(true, Ordering::SeqCst);
        inner.shut.store(true, Ordering::SeqCst);
        let subs: Vec<Arc<SubInner>> = inner
            .subs
            .lock()
            .unwrap()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        futures::future::join_all(subs.iter().map(|s| s.close())).await;
        inner.sqs_pub.stop().await;
        inner.sns_pub.stop().await;
        inner.deletes.stop().await;
        inner.visibility.stop().await;
        Ok(())
    }
}
