//! # postback-kafka
//!
//! The postback engine's event log on Apache Kafka, through `rdkafka` (librdkafka): the
//! `EventLog` seam of `postback-core` with one topic per log.
//!
//! - **Appends** go through one idempotent producer (`acks=all`, `enable.idempotence`, up to
//!   five requests in flight per connection, `linger.ms` from `KafkaConfig::linger`, LZ4) to
//!   the partition the core's partitioner gives the key (the same murmur2 Kafka's clients
//!   use). An append returns only once the broker acknowledged every record; one that is not
//!   acknowledged within the deadline (`message.timeout.ms`) fails `Unavailable`, so the
//!   front end answers 503, never a 200 and a loss. (A record whose acknowledgement was lost
//!   may still be stored: at least once, and the processors' deterministic ids make a
//!   duplicate harmless.)
//! - **Reads by partition** (the catalog, the dispatcher, replays) use a consumer outside any
//!   group, assigned one partition at a time.
//! - **Groups**: a member is a consumer in a group with the cooperative-sticky assignor and no
//!   automatic commits, polled on its own thread. A revocation waits, inside librdkafka's
//!   rebalance callback, until the member has stored and committed what it polled of the
//!   partitions it loses, so a partition moves only after its last batch is done. A commit
//!   the group refuses (as it does during a rebalance) goes again with the next one, and
//!   once more before its partition is let go: the next owner starts where the group says,
//!   and redoes what lies between that and what was stored.
//! - **Health**: a thread asks the cluster for metadata every second; while it does not
//!   answer, `health()` says so (`/ready` answers 503) and clears by itself when it does.
//!
//! It is not: a place for retention (topics carry `retention.ms`), nor for offsets the engine
//! trusts: the store's positions are the truth, and committed offsets follow them.

use postback_core::keys::{partition_of, Partition};
use postback_core::log::{EventLog, Keyed, Polled, Position, Record, Subscription};
use postback_core::seams::{BoxFuture, SeamError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How to reach the cluster, and the settings of the engine's topics.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`.
    pub brokers: String,
    /// Topics are named `<prefix>.<log>`; consumer groups `<prefix>.<group>`.
    pub prefix: String,
    /// How long a record may wait for the broker's acknowledgement before its append fails.
    pub append_timeout: Duration,
    /// Replication factor of new topics; `None`: the broker's `default.replication.factor`.
    pub replication: Option<i32>,
    /// Session timeout of group members: how soon a dead member's partitions move.
    pub session_timeout: Duration,
    /// How long the producer gathers records into a request (`linger.ms`).
    pub linger: Duration,
}

impl KafkaConfig {
    /// Parses `kafka://host:port[,host:port]/prefix` (the prefix defaults to `postbackd`).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| format!("{url}: a Kafka log URL starts with kafka://"))?;
        let (brokers, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if brokers.is_empty() {
            return Err(format!("{url}: no broker address"));
        }
        let prefix = if prefix.is_empty() {
            "postbackd"
        } else {
            prefix
        };
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "{url}: the topic prefix may hold letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(Self {
            brokers: brokers.to_string(),
            prefix: prefix.to_string(),
            append_timeout: Duration::from_secs(5),
            replication: None,
            session_timeout: Duration::from_secs(6),
            linger: Duration::from_millis(1),
        })
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // A broker that went away is retried within a second, not ten (librdkafka's
            // default backoff), so a restarted broker is noticed quickly.
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "4");
        c
    }

    /// The producer's settings: every append acknowledged by all in-sync replicas, and
    /// idempotent, so that a retried request never writes a record twice.
    fn producer(&self) -> ClientConfig {
        let timeout_ms = self.append_timeout.as_millis().max(1).to_string();
        let mut c = self.client();
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("compression.type", "lz4")
            .set("message.timeout.ms", &timeout_ms)
            .set("request.timeout.ms", &timeout_ms);
        c
    }

    /// A consumer's settings. librdkafka fetches ahead up to 64 MiB a consumer by default: a
    /// stage that fell behind in a burst held that much of its topic in memory, where a few
    /// batches ahead keep it as busy.
    fn consumer(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("queued.max.messages.kbytes", "8192");
        c
    }
}

/// A connection to the cluster, shared by the engine's logs: one producer, and the health
/// probe.
pub struct Kafka {
    config: KafkaConfig,
    producer: FutureProducer,
    /// For watermarks and metadata: a client with no fetch of its own, whose requests never
    /// queue behind a consumer's long poll on the same connection.
    meta: Arc<BaseConsumer>,
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

impl Kafka {
    /// Connects (librdkafka connects lazily; the health probe tells whether it can).
    pub fn connect(config: KafkaConfig) -> Result<Arc<Self>, SeamError> {
        let producer: FutureProducer = config
            .producer()
            .create()
            .map_err(|e| SeamError::Fatal(format!("kafka producer: {e}")))?;
        let meta: BaseConsumer = config
            .client()
            .create()
            .map_err(|e| SeamError::Fatal(format!("kafka client: {e}")))?;
        let kafka = Arc::new(Self {
            config,
            producer,
            meta: Arc::new(meta),
            failure: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
        });
        kafka.start_health_probe()?;
        Ok(kafka)
    }

    fn start_health_probe(self: &Arc<Self>) -> Result<(), SeamError> {
        let probe = self.meta.clone();
        let (failure, stop) = (self.failure.clone(), self.stop.clone());
        std::thread::Builder::new()
            .name("kafka-health".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    // Serve the client's events (connection errors queue up otherwise).
                    while probe.poll(Duration::ZERO).is_some() {}
                    let result = probe.fetch_metadata(None, Duration::from_secs(1));
                    let now = match result {
                        Ok(m) if !m.brokers().is_empty() => None,
                        Ok(_) => Some("the cluster lists no brokers".to_string()),
                        Err(e) => Some(format!("the Kafka cluster does not answer: {e}")),
                    };
                    let mut f = failure.lock().unwrap_or_else(|e| e.into_inner());
                    if f.is_some() != now.is_some() {
                        match &now {
                            Some(why) => tracing::warn!(%why, "kafka unreachable"),
                            None => tracing::info!("kafka reachable again"),
                        }
                    }
                    *f = now;
                    drop(f);
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .map_err(|e| SeamError::Fatal(format!("start kafka health probe: {e}")))?;
        Ok(())
    }

    fn health(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The log of topic `<prefix>.<name>`, created with `partitions` partitions if it is
    /// missing (an existing topic keeps its own count) and `retention` (`None`: forever).
    pub async fn log(
        self: &Arc<Self>,
        name: &str,
        partitions: Partition,
        retention: Option<Duration>,
    ) -> Result<Arc<KafkaEventLog>, SeamError> {
        let topic = format!("{}.{name}", self.config.prefix);
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client()
            .create()
            .map_err(|e| SeamError::Fatal(format!("kafka admin: {e}")))?;
        let retention_ms = retention.map_or("-1".to_string(), |r| r.as_millis().to_string());
        let replication = TopicReplication::Fixed(self.config.replication.unwrap_or(-1));
        let new = NewTopic::new(&topic, partitions as i32, replication)
            .set("retention.ms", &retention_ms)
            .set("cleanup.policy", "delete");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| unavailable("creating topics", &e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(%topic, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(SeamError::Unavailable(format!(
                        "creating topic {t}: {code}"
                    )))
                }
            }
        }
        // A new topic's partitions reach the metadata a moment after it is created.
        let mut actual = 0;
        for _ in 0..100 {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| unavailable("reading topic metadata", &e))?;
            actual = metadata
                .topics()
                .first()
                .filter(|t| t.error().is_none())
                .map_or(0, |t| t.partitions().len() as Partition);
            if actual > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if actual == 0 {
            return Err(SeamError::Unavailable(format!(
                "topic {topic} has no partitions yet"
            )));
        }
        if actual != partitions {
            tracing::warn!(%topic, actual, configured = partitions,
                "the topic exists with another partition count; using the topic's");
        }
        let reader: BaseConsumer<ReaderContext> = self
            .config
            .consumer()
            .set("group.id", format!("{}.reader", self.config.prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // Reads are of records known to be there: no long poll.
            .set("fetch.wait.max.ms", "10")
            .create_with_context(ReaderContext)
            .map_err(|e| SeamError::Fatal(format!("kafka reader: {e}")))?;
        Ok(Arc::new(KafkaEventLog {
            kafka: self.clone(),
            topic,
            partitions: actual,
            reader: Arc::new(Mutex::new(Reader {
                consumer: reader,
                meta: self.meta.clone(),
                at: None,
            })),
            metrics: ProduceMetrics::new(),
        }))
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn unavailable(what: &str, e: &KafkaError) -> SeamError {
    SeamError::Unavailable(format!("{what}: {e}"))
}

/// A produce error by kind: a record that can never be taken is `Rejected`; the rest (the
/// broker down or slow, a full queue) `Unavailable`.
fn produce_error(e: &KafkaError) -> SeamError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => SeamError::Rejected(format!("the broker refused the record: {e}")),
        _ => unavailable("kafka append", e),
    }
}

/// The reader's client: the end of a partition is how a read knows it is done, not an error
/// worth a log line.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // The end of a partition is how a read learns it is done (also as a global error).
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::warn!(%error, reason, "kafka reader");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A consumer outside any group, assigned one partition at a time, and where it is.
struct Reader {
    consumer: BaseConsumer<ReaderContext>,
    meta: Arc<BaseConsumer>,
    /// The partition assigned and the next offset it will return.
    at: Option<(Partition, u64)>,
}

impl Reader {
    fn read(
        &mut self,
        topic: &str,
        partition: Partition,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, SeamError> {
        // Nothing past `from`: answer at once rather than wait for records that are not there.
        let (_, high) = self
            .meta
            .fetch_watermarks(topic, partition as i32, Duration::from_secs(5))
            .map_err(|e| unavailable("reading watermarks", &e))?;
        let end = high.max(0) as u64;
        if from >= end {
            return Ok(Vec::new());
        }
        if self.at != Some((partition, from)) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64))
                .map_err(|e| unavailable("assigning a partition", &e))?;
            self.consumer
                .assign(&tpl)
                .map_err(|e| unavailable("assigning a partition", &e))?;
            self.at = Some((partition, from));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut next = from;
        while out.len() < max_records && next < end && Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(200)) {
                None if out.is_empty() => continue,
                None => break,
                // Records are there (`next < end`): an end-of-partition with none read yet is
                // left from an earlier read that reached the end then.
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition as i32 => {
                    if out.is_empty() {
                        continue;
                    }
                    break;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e)) => {
                    self.at = None;
                    return Err(unavailable("reading a partition", &e));
                }
                Some(Ok(m)) => {
                    let offset = m.offset() as u64;
                    // Fetched for the partition assigned before, or before `from`: not ours.
                    if m.partition() != partition as i32 || offset < next {
                        continue;
                    }
                    let payload = m.payload().unwrap_or_default().to_vec();
                    bytes = bytes.saturating_add(payload.len());
                    if bytes > max_bytes && !out.is_empty() {
                        // Not taken: read it again next time.
                        self.at = None;
                        break;
                    }
                    self.at = Some((partition, offset + 1));
                    next = offset + 1;
                    out.push(Record {
                        partition,
                        offset,
                        payload,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The Kafka implementation of [`EventLog`]: one topic.
pub struct KafkaEventLog {
    kafka: Arc<Kafka>,
    topic: String,
    partitions: Partition,
    reader: Arc<Mutex<Reader>>,
    metrics: ProduceMetrics,
}

/// The producer's metrics, registered once (a lookup by name on every append costs more than
/// the update).
struct ProduceMetrics {
    in_flight: metrics::Gauge,
    produce_seconds: metrics::Histogram,
    produce_errors: metrics::Counter,
}

impl ProduceMetrics {
    fn new() -> Self {
        Self {
            in_flight: metrics::gauge!("postbackd_kafka_in_flight"),
            produce_seconds: metrics::histogram!("postbackd_kafka_produce_seconds"),
            produce_errors: metrics::counter!("postbackd_kafka_produce_errors_total"),
        }
    }
}

impl KafkaEventLog {
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces one record to its key's partition; done when the broker has it (or not).
    async fn send(&self, r: &Keyed) -> (Partition, OwnedDeliveryResult) {
        let partition = partition_of(&r.key, self.partitions);
        let record = FutureRecord::to(&self.topic)
            .partition(partition as i32)
            .key(r.key.as_bytes())
            .payload(&r.payload);
        (
            partition,
            self.kafka.producer.send(record, Timeout::Never).await,
        )
    }
}

/// Runs blocking librdkafka work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SeamError> + Send + 'static,
) -> Result<T, SeamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SeamError::Fatal(format!("kafka task panicked: {e}")))?
}

impl EventLog for KafkaEventLog {
    fn partitions(&self) -> Partition {
        self.partitions
    }

    fn append(&self, records: Vec<Keyed>) -> BoxFuture<'_, Result<Vec<Position>, SeamError>> {
        Box::pin(async move {
            let started = Instant::now();
            let m = &self.metrics;
            m.in_flight.increment(records.len() as f64);
            // One record (a tracking request) is the common case: no set of futures to join.
            let results = match records.as_slice() {
                [one] => vec![self.send(one).await],
                _ => postback_core::log::join_all(records.iter().map(|r| self.send(r))).await,
            };
            m.in_flight.decrement(records.len() as f64);
            m.produce_seconds.record(started.elapsed().as_secs_f64());
            let mut out = Vec::with_capacity(results.len());
            for (partition, result) in results {
                match result {
                    Ok(delivery) => out.push(Position {
                        partition,
                        offset: delivery.offset as u64,
                    }),
                    Err((e, _)) => {
                        m.produce_errors.increment(1);
                        return Err(produce_error(&e));
                    }
                }
            }
            Ok(out)
        })
    }

    fn read(
        &self,
        partition: Partition,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, SeamError>> {
        let (reader, topic) = (self.reader.clone(), self.topic.clone());
        Box::pin(blocking(move || {
            reader.lock().unwrap_or_else(|e| e.into_inner()).read(
                &topic,
                partition,
                from,
                max_records,
                max_bytes,
            )
        }))
    }

    fn bounds(&self, partition: Partition) -> BoxFuture<'_, Result<(u64, u64), SeamError>> {
        let (meta, topic) = (self.kafka.meta.clone(), self.topic.clone());
        Box::pin(blocking(move || {
            let (low, high) = meta
                .fetch_watermarks(&topic, partition as i32, Duration::from_secs(5))
                .map_err(|e| unavailable("reading watermarks", &e))?;
            Ok((low.max(0) as u64, high.max(0) as u64))
        }))
    }

    fn wait_for(&self, partition: Partition, from: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Kafka has no "tell me when", and this is a hint: look a few times, then return.
            for _ in 0..10 {
                if self
                    .bounds(partition)
                    .await
                    .is_ok_and(|(_, end)| end > from)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn subscribe(
        self: Arc<Self>,
        group: &str,
    ) -> BoxFuture<'static, Result<Box<dyn Subscription>, SeamError>> {
        let group = format!("{}.{group}", self.kafka.config.prefix);
        Box::pin(async move {
            let s = KafkaSubscription::join(&self.kafka.config, &self.topic, &group)?;
            Ok(Box::new(s) as Box<dyn Subscription>)
        })
    }

    fn health(&self) -> Option<String> {
        self.kafka.health()
    }

    fn close(&self) {
        let _ = self.kafka.producer.flush(Duration::from_secs(5));
    }
}

/// What a group member's polling thread hands over, in the order it happened.
enum GroupEvent {
    Record(Record),
    Assigned(Vec<Partition>),
    /// The rebalance waits for the acknowledgement, which the member sends once it reached
    /// this event (so everything before it was stored and committed).
    Revoked(Vec<Partition>, std::sync::mpsc::Sender<()>),
    Failed(String),
}

/// Forwards rebalances to the member, in order with the records.
struct GroupContext {
    events: mpsc::Sender<GroupEvent>,
    topic: String,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (p, stats) in &topic.partitions {
                if *p >= 0 && stats.consumer_lag >= 0 {
                    metrics::gauge!("postbackd_kafka_consumer_lag",
                        "topic" => self.topic.clone(), "partition" => p.to_string())
                    .set(stats.consumer_lag as f64);
                }
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| e.partition() as Partition)
        .collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = partitions_of(tpl);
            if partitions.is_empty() {
                return;
            }
            metrics::counter!("postbackd_kafka_rebalances_total").increment(1);
            let (ack, done) = std::sync::mpsc::channel();
            if self
                .events
                .blocking_send(GroupEvent::Revoked(partitions, ack))
                .is_ok()
            {
                // The member finishes and commits its batch first (bounded: a stuck member
                // must not hold the group forever).
                let _ = done.recv_timeout(Duration::from_secs(60));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = partitions_of(tpl);
            if !partitions.is_empty() {
                metrics::counter!("postbackd_kafka_rebalances_total").increment(1);
                let _ = self.events.blocking_send(GroupEvent::Assigned(partitions));
            }
        }
    }
}

/// A member of a consumer group on Kafka.
struct KafkaSubscription {
    consumer: Arc<BaseConsumer<GroupContext>>,
    topic: String,
    events: mpsc::Receiver<GroupEvent>,
    /// An event taken from the channel but not handed over yet (it ended a batch).
    held: Option<GroupEvent>,
    /// A revocation handed over but not yet let go: the member is done with those partitions
    /// only when it polls again (a dispatcher's attempts under way outlive the poll that
    /// revoked them), so the group hears it then.
    revoked: Option<(std::sync::mpsc::Sender<()>, Vec<Partition>)>,
    /// The next offset to hand over, per partition: records before it are not.
    next: BTreeMap<Partition, u64>,
    /// Positions whose commit failed, retried while their partitions are the member's.
    unsent: Unsent,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSubscription {
    fn join(config: &KafkaConfig, topic: &str, group: &str) -> Result<Self, SeamError> {
        let (tx, rx) = mpsc::channel(8192);
        let session = config.session_timeout.as_millis().to_string();
        let heartbeat = (config.session_timeout.as_millis() / 6)
            .max(100)
            .to_string();
        let consumer: BaseConsumer<GroupContext> = config
            .consumer()
            .set("group.id", group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", &session)
            .set("heartbeat.interval.ms", &heartbeat)
            .set("statistics.interval.ms", "5000")
            .create_with_context(GroupContext {
                events: tx.clone(),
                topic: topic.to_string(),
            })
            .map_err(|e| SeamError::Fatal(format!("kafka consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| unavailable("subscribing", &e))?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (consumer.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kafka-group".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let event = match c.poll(Duration::from_millis(100)) {
                        None => continue,
                        Some(Ok(m)) => GroupEvent::Record(Record {
                            partition: m.partition() as Partition,
                            offset: m.offset() as u64,
                            payload: m.payload().unwrap_or_default().to_vec(),
                        }),
                        Some(Err(e)) => GroupEvent::Failed(e.to_string()),
                    };
                    if tx.blocking_send(event).is_err() {
                        break;
                    }
                }
                leave(&c);
            })
            .map_err(|e| SeamError::Fatal(format!("start kafka consumer thread: {e}")))?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            events: rx,
            held: None,
            revoked: None,
            next: BTreeMap::new(),
            unsent: Unsent::default(),
            stop,
            thread: Some(thread),
        })
    }
}

/// Leaves the group before the consumer is closed: closing a cooperative consumer that still
/// holds partitions can hang in librdkafka (confluentinc/librdkafka#4527), so unsubscribe and
/// serve the revocation first (bounded).
fn leave(consumer: &BaseConsumer<GroupContext>) {
    consumer.unsubscribe();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let _ = consumer.poll(Duration::from_millis(100));
        if consumer.assignment().is_ok_and(|a| a.count() == 0) {
            return;
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The thread may be waiting to hand over an event: let it.
        self.events.close();
        while self.events.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Subscription for KafkaSubscription {
    fn poll(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Polled, SeamError>> {
        Box::pin(async move {
            // Polling again says the partitions revoked last time are done with: their
            // positions go to the group first (the next owner starts there).
            if let Some((ack, partitions)) = self.revoked.take() {
                let last = self.unsent.take(&partitions);
                if last.is_empty() {
                    let _ = ack.send(());
                } else {
                    let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
                    // The acknowledgement goes with the commit, so that a poll dropped
                    // meanwhile still lets go after it. Not kept on failure: the partitions
                    // are not the member's any more.
                    let _ = blocking(move || {
                        let _ = commit_to(&consumer, &topic, &last);
                        let _ = ack.send(());
                        Ok(())
                    })
                    .await;
                }
            }
            let deadline = tokio::time::Instant::now() + wait;
            let mut out: Vec<Record> = Vec::new();
            let mut bytes = 0usize;
            loop {
                let event = match self.held.take() {
                    Some(e) => e,
                    None if out.is_empty() => {
                        match tokio::time::timeout_at(deadline, self.events.recv()).await {
                            Ok(Some(e)) => e,
                            Ok(None) => {
                                return Err(SeamError::Unavailable("the consumer stopped".into()))
                            }
                            Err(_) => return Ok(Polled::Idle),
                        }
                    }
                    None => match self.events.try_recv() {
                        Ok(e) => e,
                        Err(_) => return Ok(Polled::Records(out)),
                    },
                };
                match event {
                    GroupEvent::Record(r) => {
                        let next = self.next.get(&r.partition).copied();
                        // Not the member's (revoked meanwhile), or already handed over.
                        if next.is_none_or(|n| r.offset < n) {
                            continue;
                        }
                        self.next.insert(r.partition, r.offset + 1);
                        bytes += r.payload.len();
                        out.push(r);
                        if out.len() >= max_records || bytes >= max_bytes {
                            return Ok(Polled::Records(out));
                        }
                    }
                    other if !out.is_empty() => {
                        self.held = Some(other);
                        return Ok(Polled::Records(out));
                    }
                    GroupEvent::Assigned(ps) => {
                        for p in &ps {
                            self.next.insert(*p, 0);
                        }
                        return Ok(Polled::Assigned(ps));
                    }
                    GroupEvent::Revoked(ps, ack) => {
                        for p in &ps {
                            self.next.remove(p);
                        }
                        // Let go at the next poll, once the member has finished with them.
                        self.revoked = Some((ack, ps.clone()));
                        return Ok(Polled::Revoked(ps));
                    }
                    GroupEvent::Failed(why) => {
                        tracing::warn!(%why, "kafka consumer error");
                        metrics::counter!("postbackd_kafka_consumer_errors_total").increment(1);
                    }
                }
            }
        })
    }

    fn start_at(&mut self, partition: Partition, offset: u64) {
        if let Some(next) = self.next.get_mut(&partition) {
            *next = offset;
        }
    }

    fn commit(&mut self, positions: Vec<Position>) -> BoxFuture<'_, Result<(), SeamError>> {
        Box::pin(async move {
            // Still the member's: assigned, or revoked and not yet let go.
            let releasing = self
                .revoked
                .as_ref()
                .map_or(&[][..], |(_, ps)| ps.as_slice());
            let owned: Vec<Partition> = self.next.keys().chain(releasing).copied().collect();
            let all = self.unsent.with(&owned, positions);
            if all.is_empty() {
                return Ok(());
            }
            let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
            let sent = all.clone();
            match blocking(move || commit_to(&consumer, &topic, &sent)).await {
                Ok(()) => Ok(()),
                // The store holds the positions; the group's are where a member taking a
                // partition over starts, so those that did not land go with the next commit
                // (a partition with no more records would otherwise stay behind).
                Err(e) => {
                    tracing::warn!(error = %e, "kafka commit failed; retried with the next");
                    self.unsent.failed(all);
                    Ok(())
                }
            }
        })
    }
}

/// Commits `positions` to the member's group (synchronously: blocks).
fn commit_to(
    consumer: &BaseConsumer<GroupContext>,
    topic: &str,
    positions: &[Position],
) -> Result<(), SeamError> {
    let mut tpl = TopicPartitionList::new();
    for p in positions {
        tpl.add_partition_offset(topic, p.partition as i32, Offset::Offset(p.offset as i64))
            .map_err(|e| unavailable("committing", &e))?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| unavailable("committing", &e))
}

/// Positions whose commit to the group failed (Kafka refuses commits while a rebalance is
/// under way), kept to go with the next one.
#[derive(Debug, Default)]
struct Unsent(BTreeMap<Partition, u64>);

impl Unsent {
    /// `positions` and what is unsent of the `owned` partitions, the furthest of each; the
    /// rest is dropped (another member commits those partitions now).
    fn with(&mut self, owned: &[Partition], positions: Vec<Position>) -> Vec<Position> {
        self.0.retain(|p, _| owned.contains(p));
        self.failed(positions);
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(partition, offset)| Position { partition, offset })
            .collect()
    }

    /// Keeps `positions`, which did not land, for the next commit (the furthest of each).
    fn failed(&mut self, positions: Vec<Position>) {
        for p in positions {
            let offset = self.0.entry(p.partition).or_default();
            *offset = (*offset).max(p.offset);
        }
    }

    /// Takes what is unsent of `partitions`.
    fn take(&mut self, partitions: &[Partition]) -> Vec<Position> {
        partitions
            .iter()
            .filter_map(|p| {
                self.0.remove(p).map(|offset| Position {
                    partition: *p,
                    offset,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c =
            KafkaConfig::from_url("kafka://127.0.0.1:9092,127.0.0.1:9093/pb.test").expect("url");
        assert_eq!(c.brokers, "127.0.0.1:9092,127.0.0.1:9093");
        assert_eq!(c.prefix, "pb.test");
        assert_eq!(
            KafkaConfig::from_url("kafka://h:1").expect("url").prefix,
            "postbackd"
        );
        assert!(KafkaConfig::from_url("kafka:///x").is_err());
        assert!(KafkaConfig::from_url("file:///x").is_err());
        assert!(KafkaConfig::from_url("kafka://h:1/bad prefix").is_err());
    }

    #[test]
    fn positions_that_did_not_land_go_with_the_next_commit_while_their_partition_is_owned() {
        let at = |partition, offset| Position { partition, offset };
        let mut unsent = Unsent::default();
        assert_eq!(unsent.with(&[0, 1], vec![at(0, 5)]), vec![at(0, 5)]);
        // Partition 1's commit fails; the next commit is of partition 0 only.
        unsent.failed(vec![at(0, 5), at(1, 9)]);
        assert_eq!(
            unsent.with(&[0, 1], vec![at(0, 7)]),
            vec![at(0, 7), at(1, 9)],
            "the furthest of each partition, the failed one included"
        );
        // Once a partition is another member's, what did not land of it is dropped.
        unsent.failed(vec![at(0, 7), at(1, 9)]);
        assert_eq!(unsent.with(&[0], Vec::new()), vec![at(0, 7)]);
        assert!(unsent.with(&[0, 1], Vec::new()).is_empty());
        // Letting partitions go takes what is unsent of them, and only that.
        unsent.failed(vec![at(0, 8), at(2, 3)]);
        assert_eq!(unsent.take(&[2]), vec![at(2, 3)]);
        assert_eq!(unsent.with(&[0, 2], Vec::new()), vec![at(0, 8)]);
    }

    #[test]
    fn the_producer_is_durable_and_lingers_as_configured() {
        let mut c = KafkaConfig::from_url("kafka://h:1").expect("url");
        assert_eq!(c.producer().get("linger.ms"), Some("1"));
        c.linger = Duration::from_millis(5);
        c.append_timeout = Duration::from_millis(2500);
        let p = c.producer();
        assert_eq!(p.get("linger.ms"), Some("5"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("message.timeout.ms"), Some("2500"));
    }
}
