//! The event-log conformance suite against a real Kafka broker. The test command
//! (`deploy/test.sh`) starts one and runs these with `POSTBACKD_TEST_KAFKA=host:port`; plain
//! `cargo test` reports them as ignored.

use postback_core::keys::Partition;
use postback_core::log::{conformance, EventLog};
use postback_kafka::{Kafka, KafkaConfig};
use std::sync::Arc;
use std::time::Duration;

fn broker() -> String {
    std::env::var("POSTBACKD_TEST_KAFKA")
        .expect("POSTBACKD_TEST_KAFKA=host:port of a broker (deploy/test.sh starts one)")
}

/// A new topic of `partitions` under a prefix no other test uses.
async fn fresh(name: &str, partitions: Partition) -> Arc<dyn EventLog> {
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let mut config =
        KafkaConfig::from_url(&format!("kafka://{}/conformance-{unique}", broker())).expect("url");
    config.session_timeout = Duration::from_secs(6);
    let kafka = Kafka::connect(config).expect("connects");
    kafka.log(name, partitions, None).await.expect("topic")
}

const WAIT: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: run by deploy/test.sh"]
async fn kafka_log_conforms() {
    conformance::append_then_read(fresh("a", 3).await).await;
    conformance::records_are_kept_exactly(fresh("b", 1).await).await;
    conformance::reads_stop_at_the_byte_limit(fresh("c", 1).await).await;
    conformance::wait_for_wakes_on_append(fresh("d", 1).await).await;
    conformance::concurrent_appends_are_all_kept(fresh("e", 1).await).await;
    conformance::reads_follow_a_growing_log(fresh("h", 1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: run by deploy/test.sh"]
async fn kafka_groups_conform() {
    conformance::a_member_reads_every_partition_once(fresh("f", 3).await, WAIT).await;
    conformance::a_group_shares_and_hands_over_partitions(fresh("g", 4).await, WAIT).await;
}
