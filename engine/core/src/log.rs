//! The event-log seam: a partitioned, keyed, durable log read by partition or as a member of
//! a consumer group; the in-memory reference implementation; consumer groups within one
//! process (for the memory and embedded logs); and the conformance suite every log passes.

use crate::keys::{partition_of, Partition};
use crate::seams::{BoxFuture, SeamError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// A record's place in a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: Partition,
    pub offset: u64,
}

/// A record to append, with the key that chooses its partition ([`partition_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    pub key: String,
    pub payload: Vec<u8>,
}

impl Keyed {
    pub fn new(key: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            key: key.into(),
            payload,
        }
    }
}

/// A record with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: Partition,
    pub offset: u64,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn position(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// An append-only, durable log of records in a fixed number of partitions, each with dense
/// offsets from 0.
///
/// Contract:
/// - `append` puts each record in the partition of its key (`partition_of(key, partitions)`)
///   and returns each one's position, in order, only once all of them are durable (fsync'd, or
///   acknowledged by all in-sync replicas). Records of one call with one key keep their order.
///   On error, none of them is acknowledged; the embedded log guarantees that none of them is
///   ever read, a remote broker may still have stored some (at least once).
/// - `read` returns durable records of one partition only, in offset order, from `from` (or the
///   first kept offset, if `from` is older), bounded in count and bytes, never empty when a
///   record exists there.
/// - Offsets never change and never repeat. Retention is the backend's own (the embedded log
///   by segment age, Kafka by `retention.ms`): records older than it may be gone.
/// - `subscribe` joins a consumer group: each partition is read by one member at a time, and a
///   partition moves to another member only after its old member has let it go (cooperative).
/// - Errors keep their kind: `Unavailable` (retry later), `Rejected` (this input can never be
///   stored, for example a record too large), `Fatal` (stop).
pub trait EventLog: Send + Sync + 'static {
    /// How many partitions the log has.
    fn partitions(&self) -> Partition;
    fn append(&self, records: Vec<Keyed>) -> BoxFuture<'_, Result<Vec<Position>, SeamError>>;
    fn read(
        &self,
        partition: Partition,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, SeamError>>;
    /// The first offset kept and one past the last durable one (the watermarks).
    fn bounds(&self, partition: Partition) -> BoxFuture<'_, Result<(u64, u64), SeamError>>;
    /// Resolves once a durable record exists at `from` or beyond in `partition`, or after a
    /// while (callers check again): a hint for waiting, not a guarantee.
    fn wait_for(&self, partition: Partition, from: u64) -> BoxFuture<'_, ()>;
    /// Joins the consumer group `group` (see [`Subscription`]).
    fn subscribe(
        self: Arc<Self>,
        group: &str,
    ) -> BoxFuture<'static, Result<Box<dyn Subscription>, SeamError>>;
    /// Why the log cannot take appends now (`None` when it can); reported by `/ready`.
    fn health(&self) -> Option<String> {
        None
    }
    /// Makes everything appended so far durable and refuses later appends. Blocks until done.
    fn close(&self) {}
}

/// What a group member's `poll` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// Records of the member's partitions, in offset order within each partition.
    Records(Vec<Record>),
    /// These partitions are now the member's: call `start_at` for each before polling again.
    Assigned(Vec<Partition>),
    /// These partitions are no longer the member's. It finishes with them before polling
    /// again (stores and commits what it polled; lets work under way on them end): on Kafka
    /// the group hands them to another member only at that next poll.
    Revoked(Vec<Partition>),
    /// Nothing came within the wait.
    Idle,
}

/// A member of a consumer group.
///
/// Protocol: poll; on `Assigned`, read each partition's stored position and `start_at` it; on
/// `Records`, process them, store the results with the new positions, `commit`, and only then
/// poll again. A partition is revoked only at a poll, so what was polled before is done.
/// `poll` is cancel-safe: a dropped poll loses nothing. Dropping the subscription leaves the
/// group (its partitions go to the other members).
pub trait Subscription: Send {
    /// Waits up to `wait` for records of the member's partitions, or a change of its
    /// partitions.
    fn poll(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Polled, SeamError>>;
    /// Where reading of an assigned partition starts: records before it are never returned.
    fn start_at(&mut self, partition: Partition, offset: u64);
    /// Tells the group the positions processed (and stored) so far: the next offset of each.
    fn commit(&mut self, positions: Vec<Position>) -> BoxFuture<'_, Result<(), SeamError>>;
}

/// Resolves when any of the futures does.
pub async fn any_of(mut futures: Vec<BoxFuture<'_, ()>>) {
    std::future::poll_fn(|cx| {
        if futures.iter_mut().any(|f| f.as_mut().poll(cx).is_ready()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A minimal join_all so that this crate needs no futures dependency.
pub async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (fut, slot) in pending.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => done = false,
                }
            }
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Makes a future that resolves after a duration: the caller's timer (this crate has none).
pub type Sleeper = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// A timer without a runtime: a future that is ready once the time has passed, and asks to be
/// polled again until then. Fine for tests that drive futures by polling; a runtime's timer
/// is better everywhere else.
pub fn spinning_sleeper() -> Sleeper {
    Arc::new(|d: Duration| {
        let until = Instant::now() + d;
        Box::pin(std::future::poll_fn(move |cx| {
            if Instant::now() >= until {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }))
    })
}

/// Consumer groups within one process: members share a log's partitions round-robin by
/// member, and a moved partition is assigned to its new member only after its old member let
/// it go at a poll (cooperative rebalancing, as Kafka's cooperative-sticky assignor does).
#[derive(Clone)]
pub struct LocalGroups {
    inner: Arc<Mutex<GroupsInner>>,
    sleep: Sleeper,
}

impl Default for LocalGroups {
    fn default() -> Self {
        Self::new(spinning_sleeper())
    }
}

#[derive(Default)]
struct GroupsInner {
    groups: HashMap<String, Group>,
    next_member: u64,
    waiters: Vec<Waker>,
}

#[derive(Default)]
struct Group {
    partitions: Partition,
    members: BTreeSet<u64>,
    /// Who reads each partition now (`None`: nobody, it may be assigned).
    owner: BTreeMap<Partition, Option<u64>>,
    /// Who should.
    target: BTreeMap<Partition, u64>,
    generation: u64,
}

impl Group {
    fn rebalance(&mut self) {
        let members: Vec<u64> = self.members.iter().copied().collect();
        self.target.clear();
        if !members.is_empty() {
            for p in 0..self.partitions {
                self.target.insert(p, members[p as usize % members.len()]);
            }
        }
        self.generation += 1;
    }
}

impl LocalGroups {
    /// Groups whose members wait with `sleep`.
    pub fn new(sleep: Sleeper) -> Self {
        Self {
            inner: Arc::new(Mutex::new(GroupsInner::default())),
            sleep,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(&self, group: &str, partitions: Partition) -> u64 {
        let mut inner = self.lock();
        inner.next_member += 1;
        let member = inner.next_member;
        let g = inner.groups.entry(group.to_string()).or_default();
        g.partitions = partitions;
        for p in 0..partitions {
            g.owner.entry(p).or_insert(None);
        }
        g.members.insert(member);
        g.rebalance();
        for w in inner.waiters.drain(..) {
            w.wake();
        }
        member
    }

    fn leave(&self, group: &str, member: u64) {
        let mut inner = self.lock();
        if let Some(g) = inner.groups.get_mut(group) {
            g.members.remove(&member);
            for owner in g.owner.values_mut() {
                if *owner == Some(member) {
                    *owner = None;
                }
            }
            g.rebalance();
        }
        for w in inner.waiters.drain(..) {
            w.wake();
        }
    }

    /// The member's next change of partitions, if it has one: first what it must let go, then
    /// what it may take.
    fn change(&self, group: &str, member: u64) -> Option<Polled> {
        let mut inner = self.lock();
        let g = inner.groups.get_mut(group)?;
        let revoked: Vec<Partition> = g
            .owner
            .iter()
            .filter(|(p, o)| **o == Some(member) && g.target.get(p) != Some(&member))
            .map(|(p, _)| *p)
            .collect();
        if !revoked.is_empty() {
            for p in &revoked {
                g.owner.insert(*p, None);
            }
            g.generation += 1;
            for w in inner.waiters.drain(..) {
                w.wake();
            }
            return Some(Polled::Revoked(revoked));
        }
        let assigned: Vec<Partition> = g
            .owner
            .iter()
            .filter(|(p, o)| o.is_none() && g.target.get(p) == Some(&member))
            .map(|(p, _)| *p)
            .collect();
        if assigned.is_empty() {
            return None;
        }
        for p in &assigned {
            g.owner.insert(*p, Some(member));
        }
        Some(Polled::Assigned(assigned))
    }

    fn generation(&self, group: &str) -> u64 {
        self.lock().groups.get(group).map_or(0, |g| g.generation)
    }

    /// Resolves once the group's generation is past `seen`.
    fn changed(&self, group: String, seen: u64) -> BoxFuture<'static, ()> {
        let groups = self.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            let mut inner = groups.lock();
            if inner.groups.get(&group).map_or(0, |g| g.generation) > seen {
                Poll::Ready(())
            } else {
                inner.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        }))
    }

    /// Joins `group` of `log` as a new member.
    pub fn subscribe(&self, log: Arc<dyn EventLog>, group: &str) -> Box<dyn Subscription> {
        let member = self.join(group, log.partitions());
        Box::new(LocalSubscription {
            log,
            groups: self.clone(),
            group: group.to_string(),
            member,
            next: BTreeMap::new(),
            turn: 0,
        })
    }
}

/// A member of a [`LocalGroups`] group, reading its partitions through [`EventLog::read`].
struct LocalSubscription {
    log: Arc<dyn EventLog>,
    groups: LocalGroups,
    group: String,
    member: u64,
    /// The member's partitions and the next offset of each.
    next: BTreeMap<Partition, u64>,
    /// Which partition is read first next time, so that none starves.
    turn: usize,
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        self.groups.leave(&self.group, self.member);
    }
}

impl Subscription for LocalSubscription {
    fn poll(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Polled, SeamError>> {
        let deadline = Instant::now() + wait;
        Box::pin(async move {
            loop {
                let generation = self.groups.generation(&self.group);
                if let Some(change) = self.groups.change(&self.group, self.member) {
                    match &change {
                        Polled::Revoked(ps) => ps.iter().for_each(|p| {
                            self.next.remove(p);
                        }),
                        Polled::Assigned(ps) => ps.iter().for_each(|p| {
                            self.next.insert(*p, 0);
                        }),
                        Polled::Records(_) | Polled::Idle => {}
                    }
                    return Ok(change);
                }
                let owned: Vec<(Partition, u64)> =
                    self.next.iter().map(|(p, o)| (*p, *o)).collect();
                let mut out = Vec::new();
                let mut bytes = 0usize;
                let mut advanced = Vec::new();
                for i in 0..owned.len() {
                    let (p, from) = owned[(self.turn + i) % owned.len()];
                    if out.len() >= max_records || bytes >= max_bytes {
                        break;
                    }
                    let records = self
                        .log
                        .read(p, from, max_records - out.len(), max_bytes - bytes)
                        .await?;
                    if let Some(last) = records.last() {
                        advanced.push((p, last.offset + 1));
                    }
                    bytes += records.iter().map(|r| r.payload.len()).sum::<usize>();
                    out.extend(records);
                }
                if !out.is_empty() {
                    for (p, next) in advanced {
                        self.next.insert(p, next);
                    }
                    self.turn = self.turn.wrapping_add(1);
                    return Ok(Polled::Records(out));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Polled::Idle);
                }
                let mut waits: Vec<BoxFuture<'_, ()>> = owned
                    .iter()
                    .map(|(p, from)| self.log.wait_for(*p, *from))
                    .collect();
                waits.push(self.groups.changed(self.group.clone(), generation));
                waits.push((self.groups.sleep)(left));
                any_of(waits).await;
            }
        })
    }

    fn start_at(&mut self, partition: Partition, offset: u64) {
        if let Some(next) = self.next.get_mut(&partition) {
            *next = offset;
        }
    }

    fn commit(&mut self, _positions: Vec<Position>) -> BoxFuture<'_, Result<(), SeamError>> {
        // Within one process the store's positions are the only ones that count.
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The reference event log: records in memory, durable for as long as the process lives.
#[derive(Clone)]
pub struct MemoryEventLog {
    inner: Arc<Mutex<MemoryInner>>,
    groups: LocalGroups,
}

struct MemoryInner {
    partitions: Vec<Vec<Vec<u8>>>,
    waiters: Vec<Waker>,
}

impl MemoryEventLog {
    /// A log of `partitions` whose group members wait by spinning (see [`spinning_sleeper`]).
    pub fn new(partitions: Partition) -> Self {
        Self::with_sleeper(partitions, spinning_sleeper())
    }

    /// A log whose group members wait with `sleep`.
    pub fn with_sleeper(partitions: Partition, sleep: Sleeper) -> Self {
        Self {
            inner: Arc::new(Mutex::new(MemoryInner {
                partitions: vec![Vec::new(); partitions.max(1) as usize],
                waiters: Vec::new(),
            })),
            groups: LocalGroups::new(sleep),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        // A panic while holding this lock leaves the data consistent (plain pushes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl EventLog for MemoryEventLog {
    fn partitions(&self) -> Partition {
        self.lock().partitions.len() as Partition
    }

    fn append(&self, records: Vec<Keyed>) -> BoxFuture<'_, Result<Vec<Position>, SeamError>> {
        let mut inner = self.lock();
        let n = inner.partitions.len() as Partition;
        let positions = records
            .into_iter()
            .map(|r| {
                let partition = partition_of(&r.key, n);
                let log = &mut inner.partitions[partition as usize];
                log.push(r.payload);
                Position {
                    partition,
                    offset: log.len() as u64 - 1,
                }
            })
            .collect();
        for w in inner.waiters.drain(..) {
            w.wake();
        }
        Box::pin(std::future::ready(Ok(positions)))
    }

    fn read(
        &self,
        partition: Partition,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, SeamError>> {
        let inner = self.lock();
        let Some(log) = inner.partitions.get(partition as usize) else {
            return Box::pin(std::future::ready(Err(SeamError::Rejected(format!(
                "no partition {partition}"
            )))));
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let skip = usize::try_from(from).unwrap_or(usize::MAX);
        for (i, r) in log.iter().enumerate().skip(skip).take(max_records) {
            bytes = bytes.saturating_add(r.len());
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(Record {
                partition,
                offset: i as u64,
                payload: r.clone(),
            });
        }
        Box::pin(std::future::ready(Ok(out)))
    }

    fn bounds(&self, partition: Partition) -> BoxFuture<'_, Result<(u64, u64), SeamError>> {
        let end = self
            .lock()
            .partitions
            .get(partition as usize)
            .map_or(0, |l| l.len() as u64);
        Box::pin(std::future::ready(Ok((0, end))))
    }

    fn wait_for(&self, partition: Partition, from: u64) -> BoxFuture<'_, ()> {
        let log = self.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            let mut inner = log.lock();
            let end = inner
                .partitions
                .get(partition as usize)
                .map_or(0, |l| l.len() as u64);
            if end > from {
                Poll::Ready(())
            } else {
                inner.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        }))
    }

    fn subscribe(
        self: Arc<Self>,
        group: &str,
    ) -> BoxFuture<'static, Result<Box<dyn Subscription>, SeamError>> {
        let subscription = self.groups.clone().subscribe(self, group);
        Box::pin(std::future::ready(Ok(subscription)))
    }
}

/// The conformance suite every [`EventLog`] must pass. Each check takes a new, empty log of
/// the partition count it names.
pub mod conformance {
    use super::*;
    use std::collections::HashSet;

    fn keyed(prefix: &str, key: &str, n: usize) -> Vec<Keyed> {
        (0..n)
            .map(|i| Keyed::new(key, format!("{prefix}-{i}").into_bytes()))
            .collect()
    }

    async fn all(log: &dyn EventLog, partition: Partition) -> Vec<Record> {
        log.read(partition, 0, usize::MAX, usize::MAX)
            .await
            .expect("read")
    }

    /// A key's records go to its partition, with dense offsets from 0; reads return durable
    /// records in order; the watermarks follow. Takes a log of 3 partitions.
    pub async fn append_then_read(log: Arc<dyn EventLog>) {
        assert_eq!(log.partitions(), 3);
        for p in 0..3 {
            assert_eq!(
                log.bounds(p).await.expect("bounds"),
                (0, 0),
                "new and empty"
            );
        }
        let key = "59359dcb7e28fee0558b4567";
        let p = partition_of(key, 3);
        let a = log.append(keyed("a", key, 3)).await.expect("append");
        assert_eq!(
            a,
            (0..3)
                .map(|offset| Position {
                    partition: p,
                    offset
                })
                .collect::<Vec<_>>()
        );
        let b = log.append(keyed("b", key, 2)).await.expect("append");
        assert_eq!(b.iter().map(|x| x.offset).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(log.bounds(p).await.expect("bounds").1, 5);
        let got = all(log.as_ref(), p).await;
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(got[3].payload, b"b-0".to_vec());
        assert!(got.iter().all(|r| r.partition == p));
        let mid = log.read(p, 2, 2, usize::MAX).await.expect("read");
        assert_eq!(mid.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![2, 3]);
        assert!(log
            .read(p, 5, 10, usize::MAX)
            .await
            .expect("at end")
            .is_empty());
        assert!(log
            .read(p, 99, 10, usize::MAX)
            .await
            .expect("past end")
            .is_empty());
        assert!(log.append(vec![]).await.expect("empty append").is_empty());
        // Keys spread records over the partitions, each in order.
        let keys: Vec<String> = (0..30).map(|i| format!("{i:024x}")).collect();
        let records = keys
            .iter()
            .map(|k| Keyed::new(k.clone(), k.clone().into_bytes()))
            .collect();
        let positions = log.append(records).await.expect("append");
        for (k, pos) in keys.iter().zip(&positions) {
            assert_eq!(pos.partition, partition_of(k, 3), "{k}");
        }
        let used: HashSet<Partition> = positions.iter().map(|p| p.partition).collect();
        assert_eq!(used.len(), 3, "30 keys use every partition");
        for q in 0..3 {
            let got = all(log.as_ref(), q).await;
            let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, (0..got.len() as u64).collect::<Vec<_>>(), "dense");
            assert_eq!(log.bounds(q).await.expect("bounds").1, got.len() as u64);
        }
    }

    /// A byte limit ends a read early, but never before its first record. One partition.
    pub async fn reads_stop_at_the_byte_limit(log: Arc<dyn EventLog>) {
        let records = [100, 100, 100, 500]
            .iter()
            .map(|n| Keyed::new("k", vec![7; *n]))
            .collect();
        log.append(records).await.expect("append");
        let two = log.read(0, 0, 10, 250).await.expect("read");
        assert_eq!(two.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![0, 1]);
        let one = log.read(0, 3, 10, 10).await.expect("read");
        assert_eq!(one.len(), 1, "at least one record, however large");
        assert_eq!(one[0].payload.len(), 500);
        assert_eq!(log.read(0, 0, 10, 300).await.expect("read").len(), 3);
    }

    /// Empty and binary records survive as they are. One partition.
    pub async fn records_are_kept_exactly(log: Arc<dyn EventLog>) {
        let binary: Vec<u8> = (0..=255u8).collect();
        log.append(vec![
            Keyed::new("k", Vec::new()),
            Keyed::new("k", binary.clone()),
            Keyed::new("k", vec![0; 100_000]),
        ])
        .await
        .expect("append");
        let got = all(log.as_ref(), 0).await;
        assert_eq!(got[0].payload, Vec::<u8>::new());
        assert_eq!(got[1].payload, binary);
        assert_eq!(got[2].payload.len(), 100_000);
    }

    /// A reader that reached the end reads what is appended after, at once: the reader
    /// that follows the catalog relies on it. One partition.
    pub async fn reads_follow_a_growing_log(log: Arc<dyn EventLog>) {
        for n in 0..5u64 {
            log.append(keyed("r", "k", 1)).await.expect("append");
            let got = log.read(0, n, 10, usize::MAX).await.expect("read");
            assert_eq!(
                got.iter().map(|r| r.offset).collect::<Vec<_>>(),
                vec![n],
                "round {n}"
            );
            assert!(log
                .read(0, n + 1, 10, usize::MAX)
                .await
                .expect("end")
                .is_empty());
        }
    }

    /// `wait_for` resolves once a record exists at the offset. One partition.
    pub async fn wait_for_wakes_on_append(log: Arc<dyn EventLog>) {
        log.append(keyed("x", "k", 1)).await.expect("append");
        log.wait_for(0, 0).await; // already there
        let wait = log.wait_for(0, 1);
        log.append(keyed("y", "k", 1)).await.expect("append");
        wait.await;
        assert_eq!(log.bounds(0).await.expect("bounds").1, 2);
    }

    /// Many concurrent appends each get their own positions, and all are readable. One
    /// partition.
    pub async fn concurrent_appends_are_all_kept(log: Arc<dyn EventLog>) {
        let appends = (0..50).map(|i| log.append(keyed(&format!("c{i}"), "k", 4)));
        let results = join_all(appends).await;
        let mut offsets: Vec<u64> = results
            .into_iter()
            .flat_map(|r| r.expect("append"))
            .map(|p| p.offset)
            .collect();
        offsets.sort();
        assert_eq!(offsets, (0..200).collect::<Vec<_>>());
        assert_eq!(all(log.as_ref(), 0).await.len(), 200);
    }

    /// What a test member has: its partitions, and the records it was given.
    #[derive(Default)]
    pub struct Member {
        pub owned: BTreeSet<Partition>,
        pub got: Vec<Record>,
    }

    /// One poll of a member, handled as the protocol says: assignments start from `positions`
    /// (the store's), records are "stored" in `positions` and committed before the next poll.
    pub async fn step(
        sub: &mut dyn Subscription,
        member: &mut Member,
        positions: &Mutex<BTreeMap<Partition, u64>>,
        wait: Duration,
    ) {
        match sub.poll(7, usize::MAX, wait).await.expect("poll") {
            Polled::Assigned(ps) => {
                for p in ps {
                    let at = positions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&p)
                        .copied()
                        .unwrap_or(0);
                    sub.start_at(p, at);
                    member.owned.insert(p);
                }
            }
            Polled::Revoked(ps) => {
                for p in ps {
                    member.owned.remove(&p);
                }
            }
            Polled::Records(rs) => {
                assert!(
                    rs.iter().all(|r| member.owned.contains(&r.partition)),
                    "records only of the member's partitions"
                );
                let next: Vec<Position> = rs
                    .iter()
                    .map(|r| Position {
                        partition: r.partition,
                        offset: r.offset + 1,
                    })
                    .collect();
                {
                    let mut map = positions.lock().unwrap_or_else(|e| e.into_inner());
                    for p in &next {
                        map.insert(p.partition, p.offset);
                    }
                }
                sub.commit(next).await.expect("commit");
                member.got.extend(rs);
            }
            Polled::Idle => {}
        }
    }

    /// One member of a group gets every partition, and every record once, in order within
    /// each partition, from where its stored positions say; records appended later come too.
    /// Takes a log of 3 partitions; `wait` is how long one poll may wait.
    pub async fn a_member_reads_every_partition_once(log: Arc<dyn EventLog>, wait: Duration) {
        let keys: Vec<String> = (0..12).map(|i| format!("{i:024x}")).collect();
        let records = keys
            .iter()
            .map(|k| Keyed::new(k.clone(), k.clone().into_bytes()))
            .collect();
        log.append(records).await.expect("append");
        // The consumer had processed the first record of every partition already.
        let positions: Mutex<BTreeMap<Partition, u64>> =
            Mutex::new((0..3).map(|p| (p, 1)).collect());
        let mut sub = log.clone().subscribe("g1").await.expect("subscribe");
        let mut m = Member::default();
        for _ in 0..200 {
            if m.got.len() >= 9 {
                break;
            }
            step(sub.as_mut(), &mut m, &positions, wait).await;
        }
        assert_eq!(
            m.owned,
            (0..3).collect(),
            "a lone member gets every partition"
        );
        assert_eq!(
            m.got.len(),
            9,
            "every record after the stored positions, once"
        );
        for p in 0..3 {
            let offsets: Vec<u64> = m
                .got
                .iter()
                .filter(|r| r.partition == p)
                .map(|r| r.offset)
                .collect();
            assert_eq!(
                offsets,
                (1..=offsets.len() as u64).collect::<Vec<_>>(),
                "{p}"
            );
        }
        log.append(vec![Keyed::new("late", b"late".to_vec())])
            .await
            .expect("append");
        for _ in 0..200 {
            if m.got.len() >= 10 {
                break;
            }
            step(sub.as_mut(), &mut m, &positions, wait).await;
        }
        assert_eq!(m.got.len(), 10);
        assert_eq!(m.got[9].payload, b"late".to_vec());
    }

    /// Two members split the partitions, and when one leaves the other takes its partitions
    /// from the positions it committed: every record is read once by the group. Takes a log
    /// of 4 partitions; `wait` is how long one poll may wait.
    pub async fn a_group_shares_and_hands_over_partitions(log: Arc<dyn EventLog>, wait: Duration) {
        let key = |i: usize| format!("{i:024x}");
        let records = (0..40)
            .map(|i| Keyed::new(key(i), key(i).into_bytes()))
            .collect();
        log.append(records).await.expect("append");
        let positions: Mutex<BTreeMap<Partition, u64>> = Mutex::new(BTreeMap::new());
        let mut a = log.clone().subscribe("g2").await.expect("subscribe");
        let mut b = log.clone().subscribe("g2").await.expect("subscribe");
        let (mut ma, mut mb) = (Member::default(), Member::default());
        for _ in 0..400 {
            let settled = !ma.owned.is_empty() && !mb.owned.is_empty();
            if settled && ma.got.len() + mb.got.len() >= 40 {
                break;
            }
            step(a.as_mut(), &mut ma, &positions, wait).await;
            step(b.as_mut(), &mut mb, &positions, wait).await;
        }
        assert!(
            !ma.owned.is_empty() && !mb.owned.is_empty(),
            "the two share the partitions: {:?} {:?}",
            ma.owned,
            mb.owned
        );
        assert!(ma.owned.is_disjoint(&mb.owned));
        assert_eq!(ma.owned.len() + mb.owned.len(), 4);
        assert_eq!(
            ma.got.len() + mb.got.len(),
            40,
            "every record once between the two"
        );
        // `a` leaves; `b` takes over its partitions and reads what comes next, once.
        drop(a);
        let more = (40..60)
            .map(|i| Keyed::new(key(i), key(i).into_bytes()))
            .collect();
        log.append(more).await.expect("append");
        for _ in 0..400 {
            if ma.got.len() + mb.got.len() >= 60 && mb.owned.len() == 4 {
                break;
            }
            step(b.as_mut(), &mut mb, &positions, wait).await;
        }
        assert_eq!(mb.owned.len(), 4, "b took a's partitions");
        let mut payloads: Vec<Vec<u8>> = ma
            .got
            .iter()
            .chain(&mb.got)
            .map(|r| r.payload.clone())
            .collect();
        payloads.sort();
        let mut want: Vec<Vec<u8>> = (0..60).map(|i| key(i).into_bytes()).collect();
        want.sort();
        assert_eq!(payloads, want, "each record once across the hand-over");
    }

    pub use super::join_all;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seams::block_on;

    fn memory(partitions: Partition) -> Arc<dyn EventLog> {
        Arc::new(MemoryEventLog::new(partitions))
    }

    #[test]
    fn memory_log_conforms() {
        block_on(conformance::append_then_read(memory(3)));
        block_on(conformance::records_are_kept_exactly(memory(1)));
        block_on(conformance::reads_stop_at_the_byte_limit(memory(1)));
        block_on(conformance::wait_for_wakes_on_append(memory(1)));
        block_on(conformance::reads_follow_a_growing_log(memory(1)));
        block_on(conformance::concurrent_appends_are_all_kept(memory(1)));
        let wait = Duration::from_millis(1);
        block_on(conformance::a_member_reads_every_partition_once(
            memory(3),
            wait,
        ));
        block_on(conformance::a_group_shares_and_hands_over_partitions(
            memory(4),
            wait,
        ));
    }
}
