//! A 100-node cluster heals by its own anti-entropy rounds: every key's replicas agree again
//! within a sweep of the members, and the bytes beyond the fixed bucket sums follow the
//! divergence, not the amount of data. The table prints with
//! `cargo test -p agentstore-sim --test convergence -- --nocapture`.

use agentstore_sim::convergence::{Convergence, converge};

fn heal(nodes: usize, keys: usize, diverged: usize) -> Convergence {
    let healed = converge(7, nodes, keys, diverged, 100);
    println!(
        "{nodes:>4} nodes {keys:>6} keys {diverged:>4} diverged: {:>4} rounds, \
         {:>9} fixed bytes (sums), {:>8} bytes of repair",
        healed.rounds.map_or("none".into(), |r| r.to_string()),
        healed.sums_bytes,
        healed.repair_bytes
    );
    assert!(
        healed.rounds.is_some(),
        "{nodes} nodes, {keys} keys, {diverged} diverged: the replicas never agreed"
    );
    healed
}

#[test]
fn a_hundred_nodes_heal_within_a_sweep_with_bytes_that_follow_the_divergence() {
    let small = heal(100, 1_000, 8);
    let more_data = heal(100, 4_000, 8);
    let more_divergence = heal(100, 1_000, 64);
    // Every member is compared with once in 8 rounds.
    for healed in [small, more_data, more_divergence] {
        assert!(healed.rounds <= Some(9), "{:?}", healed.rounds);
    }
    assert!(
        more_divergence.repair_bytes > small.repair_bytes * 4,
        "8x the divergence: {} vs {} bytes of repair",
        more_divergence.repair_bytes,
        small.repair_bytes
    );
    assert!(
        more_data.repair_bytes < small.repair_bytes * 3 / 2,
        "4x the data: {} vs {} bytes of repair",
        more_data.repair_bytes,
        small.repair_bytes
    );
}

#[test]
fn three_nodes_sharing_every_key_exchange_records_of_differing_sub_buckets_only() {
    let small = heal(3, 1_000, 5);
    let large = heal(3, 16_000, 5);
    assert!(large.rounds <= Some(3), "{:?}", large.rounds);
    // 16x the data: a differing sub-bucket holds about 4 keys instead of a quarter of one,
    // far below the 16x that sending whole buckets of records would cost.
    assert!(
        large.repair_bytes < small.repair_bytes * 4,
        "{} bytes of repair for 16x the data, {} before",
        large.repair_bytes,
        small.repair_bytes
    );
}
