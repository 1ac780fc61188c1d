use super::*;
use crate::quorum::QuorumSpec;

/// The three configuration blocks of the specification, copied verbatim.
const SPEC_REDIS: &str = include_str!("../../tests/fixtures/spec-redis.yaml");
const SPEC_SUPABASE: &str = include_str!("../../tests/fixtures/spec-supabase.yaml");
const SPEC_STORAGE: &str = include_str!("../../tests/fixtures/spec-storage.yaml");

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, "agentstore.yaml")
}

#[test]
fn the_specs_redis_block_is_accepted() {
    let config = parse(SPEC_REDIS).unwrap();
    let redis = config.redis.unwrap();
    assert_eq!(redis.consistency, ConsistencyLevel::Eventual);
    assert_eq!((redis.replicas, redis.wait_timeout_ms), (2, 1000));
}

#[test]
fn the_specs_supabase_block_is_accepted() {
    let config = parse(SPEC_SUPABASE).unwrap();
    let supabase = config.supabase.unwrap();
    assert_eq!(supabase.url, "https://project.supabase.co");
    assert_eq!(supabase.isolation_level, IsolationLevel::Serializable);
    assert_eq!(supabase.connection_pool_size, 10);
}

#[test]
fn the_specs_storage_block_is_accepted() {
    let config = parse(SPEC_STORAGE).unwrap();
    assert_eq!(config.default_consistency, ConsistencyLevel::Eventual);
    assert_eq!(config.plan("agents").consistency, ConsistencyLevel::Strong);
    assert_eq!(config.plan("tasks").consistency, ConsistencyLevel::Causal);
    assert_eq!(
        config.plan("metrics").consistency,
        ConsistencyLevel::Eventual
    );
    // Collection names match the key's first segment exactly: `agent:` is not `agents`.
    assert_eq!(config.plan("agent").consistency, ConsistencyLevel::Eventual);
    assert_eq!(config.replication.strategy, ReplicationStrategy::Quorum);
    assert_eq!(config.replication.quorum, QuorumSpec { n: 3, w: 2, r: 2 });
    assert!(config.quorum_guarantee().overlapping);
}

#[test]
fn the_example_config_reproduces_the_specs_data_categories() {
    let config = parse(include_str!("../../../../examples/agentstore.yaml")).unwrap();
    let expect = [
        ("agent", Backend::Supabase, ConsistencyLevel::Strong),
        ("keys", Backend::Local, ConsistencyLevel::Strong),
        ("pow", Backend::Supabase, ConsistencyLevel::Strong),
        ("finance", Backend::Supabase, ConsistencyLevel::Strong),
        ("task", Backend::Redis, ConsistencyLevel::Causal),
        ("messages", Backend::Supabase, ConsistencyLevel::Causal),
        ("workflow", Backend::Redis, ConsistencyLevel::Causal),
        ("reputation", Backend::Redis, ConsistencyLevel::Eventual),
        ("metrics", Backend::Redis, ConsistencyLevel::Eventual),
        ("cache", Backend::Redis, ConsistencyLevel::Eventual),
        ("peers", Backend::Redis, ConsistencyLevel::Eventual),
    ];
    for (name, backend, level) in expect {
        let plan = config.plan(name);
        assert_eq!(
            (plan.backend, plan.consistency),
            (backend, level),
            "collection {name}"
        );
    }
}

#[test]
fn an_empty_file_is_the_embedded_default() {
    assert_eq!(parse("").unwrap(), Config::default());
    assert_eq!(parse("storage: {}\n").unwrap(), Config::default());
}

fn error(text: &str) -> ConfigError {
    parse(text).unwrap_err()
}

#[test]
fn an_unknown_field_is_located_and_a_near_name_suggested() {
    let err = error("storage:\n  replication:\n    strategy: quorum\n    replicaz: 3\n");
    assert_eq!((err.line, err.column), (4, 5));
    assert_eq!(err.field, "storage.replication.replicaz");
    assert_eq!(err.suggestion.as_deref(), Some("replicas"));
    assert!(
        err.to_string()
            .starts_with("agentstore.yaml:4:5: field `storage.replication.replicaz`"),
        "{err}"
    );
}

#[test]
fn an_unknown_level_is_located_and_a_near_name_suggested() {
    let err = error("storage:\n  consistency_overrides:\n    agents: strnog\n");
    assert_eq!(err.line, 3);
    assert_eq!(err.field, "storage.consistency_overrides.agents");
    assert_eq!(err.suggestion.as_deref(), Some("strong"));
}

#[test]
fn a_wrong_type_is_located() {
    let err = error("storage:\n  replication:\n    replicas: three\n");
    assert_eq!(err.line, 3);
    assert_eq!(err.field, "storage.replication.replicas");
}

#[test]
fn a_write_quorum_above_replicas_is_refused() {
    let err = error(
        "storage:\n  replication:\n    strategy: quorum\n    replicas: 3\n    write_quorum: 4\n",
    );
    assert_eq!((err.line, err.column), (5, 5));
    assert_eq!(err.field, "storage.replication.write_quorum");
    assert!(err.message.contains("write_quorum (4)"), "{err}");
}

#[test]
fn a_write_quorum_that_contradicts_the_strategy_is_refused() {
    let err = error(
        "storage:\n  replication:\n    strategy: async\n    replicas: 3\n    write_quorum: 2\n",
    );
    assert_eq!(err.field, "storage.replication.write_quorum");
}

#[test]
fn a_backend_without_its_block_is_refused() {
    let err = error("storage:\n  collections:\n    tasks:\n      backend: redis\n");
    assert_eq!(err.field, "storage.collections.tasks.backend");
    assert_eq!(err.line, 4);
}

#[test]
fn conflicting_levels_for_one_collection_are_refused() {
    let err = error(
        "storage:\n  consistency_overrides:\n    tasks: causal\n  collections:\n    tasks:\n      consistency: strong\n",
    );
    assert_eq!(err.field, "storage.consistency_overrides.tasks");
    assert_eq!(err.line, 3);
}

#[test]
fn bad_collection_names_and_node_ids_are_refused() {
    assert_eq!(
        error("storage:\n  consistency_overrides:\n    \"a b\": strong\n").line,
        3
    );
    assert_eq!(
        error("storage:\n  node_id: \"\"\n").field,
        "storage.node_id"
    );
}

#[test]
fn guarantees_are_computed_not_copied_from_the_label() {
    let config = parse(
        "storage:\n  redis:\n    consistency: strong\n    replicas: 2\n  collections:\n    locks:\n      backend: redis\n      consistency: strong\n",
    )
    .unwrap();
    let plan = config.plan("locks");
    assert_eq!(plan.guarantee.level, ConsistencyLevel::Strong);
    assert!(
        plan.guarantee
            .caveat
            .as_deref()
            .unwrap()
            .contains("not linearizable")
    );

    let config = parse(
        "storage:\n  redis: {}\n  collections:\n    tasks:\n      backend: redis\n      consistency: causal\n",
    )
    .unwrap();
    // Causal on an asynchronous Redis: one primary orders every write, and sessions read
    // replicas only once they caught up; a failover is the caveat.
    let plan = config.plan("tasks");
    assert_eq!(plan.guarantee.level, ConsistencyLevel::Causal);
    assert!(
        plan.guarantee
            .caveat
            .as_deref()
            .unwrap()
            .contains("failover")
    );
    // Strong on an asynchronous Redis is flagged and refused.
    let config = parse(
        "storage:\n  redis: {}\n  collections:\n    locks:\n      backend: redis\n      consistency: strong\n",
    )
    .unwrap();
    let plan = config.plan("locks");
    assert_eq!(plan.guarantee.level, ConsistencyLevel::Eventual);
    assert!(
        plan.guarantee.caveat.is_some(),
        "asking more than the backend gives is flagged"
    );

    // With WAIT configured, only collections that ask for more than eventual wait.
    let config = parse(
        "storage:\n  redis:\n    consistency: strong\n    replicas: 1\n  collections:\n    metrics:\n      backend: redis\n    locks:\n      backend: redis\n      consistency: causal\n",
    )
    .unwrap();
    assert_eq!(
        config.plan("metrics").guarantee.level,
        ConsistencyLevel::Eventual
    );
    assert!(
        config
            .redis_wait(Backend::Redis, ConsistencyLevel::Eventual)
            .is_none()
    );
    assert_eq!(
        config.plan("locks").guarantee.level,
        ConsistencyLevel::Strong
    );
    assert!(
        config
            .redis_wait(Backend::Redis, ConsistencyLevel::Causal)
            .is_some()
    );

    assert_eq!(
        Config::default().plan("anything").guarantee.level,
        ConsistencyLevel::Strong
    );
}

#[test]
fn a_cluster_block_names_the_nodes_addresses_and_peers() {
    let text = "storage:\n  node_id: node-a\n  replication:\n    strategy: quorum\n    replicas: 3\n  cluster:\n    client_addr: 127.0.0.1:7001\n    peer_addr: 127.0.0.1:7101\n    authority: ./cluster/authority.key.pub\n    peers:\n      node-b: 127.0.0.1:7102\n      node-c: 127.0.0.1:7103\n";
    let cluster = parse(text).unwrap().cluster.unwrap();
    assert_eq!(cluster.client_addr.port(), 7001);
    assert_eq!(cluster.resp_addr, None, "no RESP endpoint unless asked for");
    assert_eq!(cluster.peers.len(), 2);
    assert_eq!(
        cluster.peer_auth,
        PeerAuth::Authority("./cluster/authority.key.pub".into())
    );
}

#[test]
fn a_resp_address_is_an_address_or_a_located_error() {
    let text = format!("{CLUSTER}    insecure: true\n    resp_addr: 127.0.0.1:6380\n");
    let cluster = parse(&text).unwrap().cluster.unwrap();
    assert_eq!(cluster.resp_addr, Some("127.0.0.1:6380".parse().unwrap()));
    let bad = parse(&format!(
        "{CLUSTER}    insecure: true\n    resp_addr: redis\n"
    ))
    .unwrap_err();
    assert_eq!(
        (bad.field.as_str(), bad.line),
        ("storage.cluster.resp_addr", 6)
    );
}

const CLUSTER: &str =
    "storage:\n  cluster:\n    client_addr: 127.0.0.1:1\n    peer_addr: 127.0.0.1:2\n";

#[test]
fn a_cluster_names_the_authority_that_admits_its_nodes_or_says_it_is_insecure() {
    let err = error(CLUSTER);
    assert_eq!((err.field.as_str(), err.line), ("storage.cluster", 2));
    assert!(err.message.contains("authority"), "{}", err.message);
    let insecure = parse(&format!("{CLUSTER}    insecure: true\n")).unwrap();
    assert_eq!(insecure.cluster.unwrap().peer_auth, PeerAuth::Insecure);
    let both = error(&format!(
        "{CLUSTER}    authority: a.pub\n    insecure: true\n"
    ));
    assert_eq!(
        (both.field.as_str(), both.line),
        ("storage.cluster.insecure", 6)
    );
    let key = "ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    let inline = parse(&format!("{CLUSTER}    authority: {key}\n")).unwrap();
    assert_eq!(
        inline.cluster.as_ref().unwrap().peer_auth,
        PeerAuth::Authority(key.into())
    );
    assert_eq!(
        inline
            .cluster
            .as_ref()
            .map(|c| (c.client_auth, c.client_tls)),
        Some((ClientAuth::Tokens, false)),
        "tokens are the default with an authority"
    );
    let open = parse(&format!("{CLUSTER}    insecure: true\n")).unwrap();
    assert_eq!(open.cluster.unwrap().client_auth, ClientAuth::Open);
    let tls_without_authority = error(&format!(
        "{CLUSTER}    insecure: true\n    client_tls: true\n"
    ));
    assert_eq!(tls_without_authority.field, "storage.cluster.client_tls");
    let tokens_without_authority = error(&format!(
        "{CLUSTER}    insecure: true\n    clients: tokens\n"
    ));
    assert_eq!(tokens_without_authority.field, "storage.cluster.clients");
    let bad = error(&format!("{CLUSTER}    authority: ed25519:short\n"));
    assert_eq!(
        (bad.field.as_str(), bad.line),
        ("storage.cluster.authority", 5)
    );
}

#[test]
fn cluster_mistakes_are_located() {
    let err = error(
        "storage:\n  cluster:\n    client_addr: localhost\n    peer_addr: 127.0.0.1:1\n    insecure: true\n",
    );
    assert_eq!(
        (err.field.as_str(), err.line),
        ("storage.cluster.client_addr", 3)
    );
    let err = error(
        "storage:\n  node_id: a\n  cluster:\n    client_addr: 127.0.0.1:1\n    peer_addr: 127.0.0.1:2\n    insecure: true\n    peers:\n      a: 127.0.0.1:3\n",
    );
    assert_eq!(
        (err.field.as_str(), err.line),
        ("storage.cluster.peers.a", 8)
    );
    let err = error(
        "storage:\n  replication:\n    strategy: quorum\n    replicas: 3\n  cluster:\n    client_addr: 127.0.0.1:1\n    peer_addr: 127.0.0.1:2\n    insecure: true\n",
    );
    assert_eq!(err.field, "storage.replication.replicas");
}

#[test]
fn redis_read_replicas_are_listed_and_checked() {
    let config = parse(
        "storage:\n  redis:\n    read_replicas: [redis://127.0.0.1:6380, redis://127.0.0.1:6381]\n",
    )
    .unwrap();
    let redis = config.redis.unwrap();
    assert_eq!(
        redis.read_replicas,
        vec!["redis://127.0.0.1:6380", "redis://127.0.0.1:6381"]
    );
    let err = parse("storage:\n  redis:\n    read_replicas: redis://127.0.0.1:6380\n").unwrap_err();
    assert!(err.to_string().contains("read_replicas"), "{err}");
}

#[test]
fn a_signed_collection_is_lww_on_the_local_backend_of_a_cluster_with_an_authority() {
    let with = |collection: &str, cluster: &str| {
        parse(&format!(
            "storage:\n  redis:\n    url: redis://127.0.0.1\n  collections:\n    posts: {collection}\n  cluster:\n    client_addr: 127.0.0.1:1\n    peer_addr: 127.0.0.1:2\n    {cluster}\n"
        ))
    };
    let config = with("{ signed: true }", "authority: a.pub").unwrap();
    assert!(config.plan("posts").signed);
    assert!(!config.plan("other").signed);
    for (collection, cluster, says) in [
        (
            "{ signed: true, conflict: pn_counter }",
            "authority: a.pub",
            "lww",
        ),
        (
            "{ signed: true, backend: redis }",
            "authority: a.pub",
            "local",
        ),
        ("{ signed: true }", "insecure: true", "authority"),
    ] {
        let err = with(collection, cluster).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.line),
            ("storage.collections.posts.signed", 5),
            "{collection}"
        );
        assert!(err.message.contains(says), "{}", err.message);
    }
    let err = error("storage:\n  collections:\n    posts: { signed: true }\n");
    assert_eq!(err.field, "storage.collections.posts.signed");
}

#[test]
fn an_ot_text_collection_must_be_strong_and_the_error_says_where() {
    let config = parse(
        "storage:\n  collections:\n    docs:\n      consistency: strong\n      conflict: ot_text\n",
    )
    .unwrap();
    assert_eq!(config.plan("docs").conflict, ConflictStrategy::Document);
    let err = error("storage:\n  collections:\n    docs:\n      conflict: ot_text\n");
    assert_eq!(
        (err.field.as_str(), err.line),
        ("storage.collections.docs.conflict", 4)
    );
    assert!(err.message.contains("must be strong"), "{}", err.message);
    // Strong through the overrides is strong.
    parse(
        "storage:\n  consistency_overrides:\n    docs: strong\n  collections:\n    docs:\n      conflict: ot_text\n",
    )
    .unwrap();
    let err = error("storage:\n  default_conflict: ot_text\n");
    assert_eq!(err.field, "storage.default_conflict");
    let err = error(
        "storage:\n  collections:\n    docs:\n      consistency: strong\n      conflict: ot_text\n      encrypted: true\n",
    );
    assert_eq!(err.field, "storage.collections.docs.encrypted");
}
