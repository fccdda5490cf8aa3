//! The reference stores: everything in memory, queries by scanning. Small and obviously right,
//! so that the other stores can be held to it by the conformance suites. One `MemoryStore` is
//! an analytics store, a state store and a delivery queue, each with tables of its own.

use crate::delivery::{AttemptRow, DeliveryRecord, DueJobs, DueQuery, JobState, JobStatus};
use crate::keys::Partition;
use crate::log::Position;
use crate::processor::{Lookups, ServerPostbackRow};
use crate::rules::{Click, Conversion};
use crate::seams::{
    AnalyticsRows, AnalyticsStore, AttemptQuery, BoxFuture, ConversionQuery, DeliveryQueue,
    GroupKey, Page, SeamError, ServerPostbackQuery, StateChanges, StateStore, SummaryQuery,
    SummaryRow,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    // The analytics store. Listed rows carry the write sequence number they were inserted at:
    // it is the snapshot they belong to.
    written: u64,
    clicks: HashMap<String, Click>,
    postbacks: HashMap<String, (u64, ServerPostbackRow)>,
    conversions: HashMap<String, (u64, Conversion)>,
    attempts: HashMap<(String, u32), (u64, AttemptRow)>,
    // The state store.
    positions: HashMap<(String, Partition), u64>,
    state_clicks: HashMap<String, Click>,
    state_conversions: HashMap<String, Conversion>,
    // The delivery queue.
    queue_positions: HashMap<(String, Partition), u64>,
    jobs: HashMap<String, JobState>,
    /// The deliveries-log partition each job came from.
    job_partitions: HashMap<String, Partition>,
}

impl Inner {
    fn next_seq(&mut self) -> u64 {
        self.written += 1;
        self.written
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

/// A page of rows already filtered to the snapshot and sorted.
fn page<T: Clone>(rows: Vec<&T>, offset: u64, limit: u64, snapshot: u64) -> Page<T> {
    Page {
        total: rows.len() as u64,
        rows: rows
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .cloned()
            .collect(),
        snapshot,
    }
}

/// The server-postback filters (paging aside).
fn matches_filters(r: &ServerPostbackRow, q: &ServerPostbackQuery) -> bool {
    r.at_us >= q.from_us
        && r.at_us < q.to_us
        && (q.offers.is_empty() || q.offers.contains(&r.offer_id))
        && (q.partners.is_empty() || q.partners.contains(&r.pid))
        && (q.suppliers.is_empty() || q.suppliers.contains(&r.advertiser_id))
        && q.id.as_ref().is_none_or(|v| *v == r.id)
        && q.click_id.as_ref().is_none_or(|v| *v == r.clickid)
        && q.action_id.as_ref().is_none_or(|v| *v == r.action_id)
        && q.goal
            .as_ref()
            .is_none_or(|v| v.to_lowercase() == r.goal.to_lowercase())
        && q.status.is_none_or(|v| v == r.status)
        && q.response_status.is_none_or(|v| v == r.response_status)
        && q.search
            .as_ref()
            .is_none_or(|s| s.is_empty() || matches_search(r, s))
}

fn matches_search(row: &ServerPostbackRow, needle: &str) -> bool {
    let needle = needle.to_lowercase();
    row.get
        .iter()
        .chain(row.post.iter())
        .any(|(k, v)| format!("{k}={v}").to_lowercase().contains(&needle))
}

impl AnalyticsStore for MemoryStore {
    fn insert(&self, rows: AnalyticsRows) -> BoxFuture<'_, Result<(), SeamError>> {
        let mut inner = self.lock();
        for c in rows.clicks {
            inner.clicks.entry(c.click_id.clone()).or_insert(c);
        }
        for r in rows.postbacks {
            if !inner.postbacks.contains_key(&r.id) {
                let seq = inner.next_seq();
                inner.postbacks.insert(r.id.clone(), (seq, r));
            }
        }
        for c in rows.conversions {
            match inner.conversions.get_mut(&c.id) {
                // A new state keeps the row's place in the listings.
                Some((_, existing)) => {
                    if c.version() >= existing.version() {
                        *existing = c;
                    }
                }
                None => {
                    let seq = inner.next_seq();
                    inner.conversions.insert(c.id.clone(), (seq, c));
                }
            }
        }
        for a in rows.attempts {
            let key = (a.attempt.job_id.clone(), a.attempt.attempt);
            if !inner.attempts.contains_key(&key) {
                let seq = inner.next_seq();
                inner.attempts.insert(key, (seq, a));
            }
        }
        ready(Ok(()))
    }

    fn summary(&self, q: SummaryQuery) -> BoxFuture<'_, Result<Vec<SummaryRow>, SeamError>> {
        let inner = self.lock();
        let mut groups: BTreeMap<GroupKey, SummaryRow> = BTreeMap::new();
        for (_, row) in inner
            .postbacks
            .values()
            .filter(|(_, r)| matches_filters(r, &q.filters))
        {
            let group = SummaryRow::group_of(row, &q.group_by);
            groups.entry(group.key()).or_insert(group).count(row);
        }
        ready(Ok(groups.into_values().collect()))
    }

    fn server_postbacks(
        &self,
        q: ServerPostbackQuery,
    ) -> BoxFuture<'_, Result<Page<ServerPostbackRow>, SeamError>> {
        let inner = self.lock();
        let snapshot = q.snapshot.unwrap_or(inner.written);
        let mut rows: Vec<(u64, &ServerPostbackRow)> = inner
            .postbacks
            .values()
            .map(|(seq, r)| (*seq, r))
            .filter(|(seq, _)| *seq <= snapshot)
            .filter(|(_, r)| matches_filters(r, &q))
            .filter(|(_, r)| r.at_us >= q.from_us && r.at_us < q.to_us)
            .collect();
        rows.sort_by(|(_, a), (_, b)| b.at_us.cmp(&a.at_us).then(b.id.cmp(&a.id)));
        ready(Ok(page(
            rows.into_iter().map(|(_, r)| r).collect(),
            q.offset,
            q.limit,
            snapshot,
        )))
    }

    fn conversions(
        &self,
        q: ConversionQuery,
    ) -> BoxFuture<'_, Result<Page<Conversion>, SeamError>> {
        let inner = self.lock();
        let snapshot = q.snapshot.unwrap_or(inner.written);
        let mut rows: Vec<&Conversion> = inner
            .conversions
            .values()
            .filter(|(seq, _)| *seq <= snapshot)
            .map(|(_, c)| c)
            .filter(|c| c.created_us >= q.from_us && c.created_us < q.to_us)
            .filter(|c| q.statuses.is_empty() || q.statuses.contains(&c.status))
            .filter(|c| q.offers.is_empty() || q.offers.contains(&c.offer_id))
            .filter(|c| q.advertisers.is_empty() || q.advertisers.contains(&c.advertiser_id))
            .filter(|c| q.partners.is_empty() || q.partners.contains(&c.pid))
            .filter(|c| {
                q.goal
                    .as_ref()
                    .is_none_or(|v| v.to_lowercase() == c.goal.to_lowercase())
            })
            .filter(|c| q.action_id.as_ref().is_none_or(|v| *v == c.action_id))
            .filter(|c| q.clickid.as_ref().is_none_or(|v| *v == c.clickid))
            .filter(|c| q.conversion_id.as_ref().is_none_or(|v| *v == c.id))
            .filter(|c| {
                q.subs.iter().enumerate().all(|(i, s)| {
                    s.as_ref()
                        .is_none_or(|v| c.subs.get(i).is_some_and(|x| x == v))
                })
            })
            .collect();
        rows.sort_by(|a, b| b.created_us.cmp(&a.created_us).then(b.id.cmp(&a.id)));
        ready(Ok(page(rows, q.offset, q.limit, snapshot)))
    }

    fn clicks(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<Click>, SeamError>> {
        let inner = self.lock();
        ready(Ok(ids
            .iter()
            .filter_map(|id| inner.clicks.get(id).cloned())
            .collect()))
    }

    fn conversion_states(
        &self,
        keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<Conversion>, SeamError>> {
        let inner = self.lock();
        let keys: std::collections::HashSet<String> = keys.into_iter().collect();
        ready(Ok(inner
            .conversions
            .values()
            .map(|(_, c)| c)
            .filter(|c| keys.contains(&c.key))
            .cloned()
            .collect()))
    }

    fn attempts(&self, q: AttemptQuery) -> BoxFuture<'_, Result<Page<AttemptRow>, SeamError>> {
        let inner = self.lock();
        let snapshot = q.snapshot.unwrap_or(inner.written);
        let mut rows: Vec<(u64, &AttemptRow)> = inner
            .attempts
            .values()
            .map(|(seq, r)| (*seq, r))
            .filter(|(seq, _)| *seq <= snapshot)
            .filter(|(_, r)| r.attempt.at_us >= q.from_us && r.attempt.at_us < q.to_us)
            .filter(|(_, r)| q.offers.is_empty() || q.offers.contains(&r.job.offer_id))
            .filter(|(_, r)| q.partners.is_empty() || q.partners.contains(&r.job.pid))
            .filter(|(_, r)| {
                q.goal
                    .as_ref()
                    .is_none_or(|g| g.to_lowercase() == r.job.goal.to_lowercase())
            })
            .filter(|(_, r)| q.status.is_none_or(|s| s == r.job.status))
            .filter(|(_, r)| q.http_code.is_none_or(|c| c == r.attempt.http_code))
            .filter(|(_, r)| q.job_id.as_ref().is_none_or(|j| *j == r.job.job_id))
            .collect();
        rows.sort_by(|(_, a), (_, b)| {
            (b.attempt.at_us, &b.job.job_id, b.attempt.attempt).cmp(&(
                a.attempt.at_us,
                &a.job.job_id,
                a.attempt.attempt,
            ))
        });
        ready(Ok(page(
            rows.into_iter().map(|(_, r)| r).collect(),
            q.offset,
            q.limit,
            snapshot,
        )))
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        let mut inner = self.lock();
        let count =
            |i: &Inner| i.clicks.len() + i.postbacks.len() + i.conversions.len() + i.attempts.len();
        let before = count(&inner);
        inner.clicks.retain(|_, c| c.at_us >= before_us);
        inner.postbacks.retain(|_, (_, r)| r.at_us >= before_us);
        inner
            .conversions
            .retain(|_, (_, c)| c.created_us >= before_us);
        inner
            .attempts
            .retain(|_, (_, a)| a.attempt.at_us >= before_us);
        ready(Ok((before - count(&inner)) as u64))
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), SeamError>> {
        let mut inner = self.lock();
        inner.clicks.clear();
        inner.postbacks.clear();
        inner.conversions.clear();
        inner.attempts.clear();
        ready(Ok(()))
    }
}

impl StateStore for MemoryStore {
    fn position(
        &self,
        consumer: &str,
        partition: Partition,
    ) -> BoxFuture<'_, Result<u64, SeamError>> {
        let key = (consumer.to_string(), partition);
        ready(Ok(self.lock().positions.get(&key).copied().unwrap_or(0)))
    }

    fn lookup(
        &self,
        click_ids: Vec<String>,
        keys: Vec<String>,
    ) -> BoxFuture<'_, Result<Lookups, SeamError>> {
        let inner = self.lock();
        let mut out = Lookups::default();
        for id in click_ids {
            if let Some(c) = inner.state_clicks.get(&id) {
                out.clicks.insert(id, c.clone());
            }
        }
        for key in keys {
            if let Some(c) = inner.state_conversions.get(&key) {
                out.conversions.insert(key, c.clone());
            }
        }
        ready(Ok(out))
    }

    fn commit(
        &self,
        consumer: &str,
        state: StateChanges,
        next: Vec<Position>,
    ) -> BoxFuture<'_, Result<(), SeamError>> {
        let mut inner = self.lock();
        for c in state.clicks {
            inner.state_clicks.entry(c.click_id.clone()).or_insert(c);
        }
        for c in state.conversions {
            inner.state_conversions.insert(c.key.clone(), c);
        }
        for p in next {
            inner
                .positions
                .insert((consumer.to_string(), p.partition), p.offset);
        }
        ready(Ok(()))
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        let mut inner = self.lock();
        let before = inner.state_clicks.len() + inner.state_conversions.len();
        inner.state_clicks.retain(|_, c| c.at_us >= before_us);
        inner
            .state_conversions
            .retain(|_, c| c.created_us >= before_us);
        let after = inner.state_clicks.len() + inner.state_conversions.len();
        ready(Ok((before - after) as u64))
    }
}

impl DeliveryQueue for MemoryStore {
    fn position(
        &self,
        consumer: &str,
        partition: Partition,
    ) -> BoxFuture<'_, Result<u64, SeamError>> {
        let key = (consumer.to_string(), partition);
        let inner = self.lock();
        ready(Ok(inner.queue_positions.get(&key).copied().unwrap_or(0)))
    }

    fn apply_deliveries(
        &self,
        consumer: &str,
        records: Vec<DeliveryRecord>,
        next: Position,
    ) -> BoxFuture<'_, Result<(), SeamError>> {
        let mut inner = self.lock();
        for record in records {
            match record {
                DeliveryRecord::Job(job) => {
                    let id = job.job_id.clone();
                    let next_at_us = job.at_us;
                    inner
                        .job_partitions
                        .entry(id.clone())
                        .or_insert(next.partition);
                    inner.jobs.entry(id).or_insert(JobState {
                        job,
                        status: JobStatus::Pending,
                        attempts: 0,
                        round_base: 0,
                        next_at_us,
                    });
                }
                DeliveryRecord::Attempt(a) => {
                    // Attempts of a job are numbered in order: one at or below the count was
                    // applied already.
                    if let Some(state) = inner.jobs.get_mut(&a.job_id) {
                        if a.attempt > state.attempts {
                            state.attempts = a.attempt;
                            state.status = a.state;
                            state.next_at_us = a.next_at_us.unwrap_or(state.next_at_us);
                        }
                    }
                }
                DeliveryRecord::Resend { job_id, at_us } => {
                    if let Some(state) = inner.jobs.get_mut(&job_id) {
                        state.status = JobStatus::Pending;
                        state.next_at_us = at_us;
                        state.round_base = state.attempts;
                    }
                }
            }
        }
        inner
            .queue_positions
            .insert((consumer.to_string(), next.partition), next.offset);
        ready(Ok(()))
    }

    fn due_jobs(&self, q: DueQuery) -> BoxFuture<'_, Result<DueJobs, SeamError>> {
        let inner = self.lock();
        let mut by_host: BTreeMap<String, Vec<&JobState>> = BTreeMap::new();
        let wanted = |id: &String| {
            q.partitions
                .as_ref()
                .is_none_or(|ps| inner.job_partitions.get(id).is_some_and(|p| ps.contains(p)))
        };
        for j in inner
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Pending && wanted(&j.job.job_id))
        {
            by_host.entry(j.job.host()).or_default().push(j);
        }
        let hosts: Vec<&String> = by_host.keys().collect();
        let start = hosts.partition_point(|h| h.as_str() <= q.after_host.as_str());
        let mut out = DueJobs {
            jobs: Vec::new(),
            last_host: q.after_host.clone(),
        };
        let order = hosts[start..].iter().chain(&hosts[..start]);
        for (visited, host) in order.enumerate() {
            if out.jobs.len() >= q.limit || visited >= q.max_hosts {
                break;
            }
            let mut due: Vec<&JobState> = by_host[*host]
                .iter()
                .copied()
                .filter(|j| j.next_at_us <= q.now_us)
                .collect();
            due.sort_by(|a, b| {
                a.next_at_us
                    .cmp(&b.next_at_us)
                    .then(a.job.job_id.cmp(&b.job.job_id))
            });
            out.jobs.extend(due.into_iter().take(q.per_host).cloned());
            out.last_host = (*host).clone();
        }
        ready(Ok(out))
    }

    fn jobs(&self, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<JobState>, SeamError>> {
        let inner = self.lock();
        ready(Ok(ids
            .iter()
            .filter_map(|id| inner.jobs.get(id).cloned())
            .collect()))
    }

    fn failed_jobs(
        &self,
        pid: u64,
        from_us: i64,
        to_us: i64,
    ) -> BoxFuture<'_, Result<Vec<String>, SeamError>> {
        let inner = self.lock();
        let mut ids: Vec<String> = inner
            .jobs
            .values()
            .filter(|j| j.job.pid == pid && j.job.at_us >= from_us && j.job.at_us < to_us)
            .filter(|j| matches!(j.status, JobStatus::Failed | JobStatus::GaveUp))
            .map(|j| j.job.job_id.clone())
            .collect();
        ids.sort();
        ready(Ok(ids))
    }

    fn expire(&self, before_us: i64) -> BoxFuture<'_, Result<u64, SeamError>> {
        let mut inner = self.lock();
        let before = inner.jobs.len();
        inner.jobs.retain(|_, j| j.job.at_us >= before_us);
        let Inner {
            jobs,
            job_partitions,
            ..
        } = &mut *inner;
        job_partitions.retain(|id, _| jobs.contains_key(id));
        ready(Ok((before - inner.jobs.len()) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seams::block_on;
    use crate::store_conformance as suite;
    use std::sync::Arc;

    #[test]
    fn conforms() {
        block_on(suite::analytics_suite(&|| {
            Box::pin(async { Arc::new(MemoryStore::new()) as Arc<dyn AnalyticsStore> })
        }));
        block_on(suite::state_suite(&|| {
            Box::pin(async { Arc::new(MemoryStore::new()) as Arc<dyn StateStore> })
        }));
        block_on(suite::queue_suite(&|| {
            Box::pin(async { Arc::new(MemoryStore::new()) as Arc<dyn DeliveryQueue> })
        }));
    }
}
