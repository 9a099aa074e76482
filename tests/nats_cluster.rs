//! The NATS cluster harness itself (`support/nats.rs`): it starts, a
//! replicated stream survives one server killed and restarted, and a paused
//! server resumes.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use support::nats::NatsCluster;

/// How long a publish may take to be acked while the cluster recovers: a
/// restarted server catching up while another is paused can take longer
/// than an election on a busy 2-core machine (seen: over 10 s during a full
/// test run). This test shows the cluster survives, not how fast.
const ACK_PATIENCE: Duration = Duration::from_secs(45);

/// Publishes one message to `subject` and waits for its ack, retrying
/// while the stream elects a leader (after a kill), at most
/// [`ACK_PATIENCE`]. A retry may store the message twice, so the ids make
/// it idempotent.
async fn publish_acked(js: &jetstream::Context, subject: &str, id: &str) -> u64 {
    let started = Instant::now();
    loop {
        let attempt = async {
            js.send_publish(
                subject.to_string(),
                jetstream::message::PublishMessage::build()
                    .payload("x".into())
                    .message_id(id),
            )
            .await?
            .await
            .map_err(|e| e.to_string().into())
        };
        let outcome: Result<_, Box<dyn std::error::Error + Send + Sync>> =
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Err("timed out".into()),
            };
        match outcome {
            Ok(ack) => return ack.sequence,
            Err(e) if started.elapsed() < ACK_PATIENCE => {
                eprintln!("publish {id}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("publish {id} not acked within {ACK_PATIENCE:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_servers_survive_a_kill_restart_and_pause() {
    let mut cluster = NatsCluster::start(3);
    assert_eq!(cluster.servers(), 3);
    assert_eq!(cluster.urls().split(',').count(), 3);

    let client = async_nats::connect(cluster.addrs()).await.expect("connect");
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: "H".to_string(),
        subjects: vec!["h.>".to_string()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("R3 stream");
    assert_eq!(publish_acked(&js, "h.a", "m1").await, 1);

    // The client may be connected to the killed one: it reconnects.
    cluster.kill(0);
    assert_eq!(publish_acked(&js, "h.a", "m2").await, 2);
    cluster.restart(0);
    cluster.wait_jetstream();

    // A client connected to a paused server hangs until its ping times out
    // (its TCP connection stays open), so this one talks to n2 alone.
    let single = async_nats::connect(cluster.url(2))
        .await
        .expect("connect n2");
    let js2 = jetstream::new(single);
    cluster.pause(1);
    assert_eq!(publish_acked(&js2, "h.a", "m3").await, 3);
    cluster.resume(1);
    assert_eq!(publish_acked(&js2, "h.a", "m4").await, 4);

    let info = js2
        .get_stream("H")
        .await
        .unwrap_or_else(|e| panic!("stream info from n2: {e}\n{}", cluster.logs()))
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, 4);
}
