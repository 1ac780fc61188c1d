//! Which engine serves each collection.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use agentstore_core::ConsistencyLevel;
use agentstore_core::config::{Backend, CollectionPlan, Config, IsolationLevel};
use agentstore_engine::{
    AnyEngine, DynEngine, EngineMetrics, Instrumented, Isolation, LocalEngine, NodeClock,
    PostgresEngine, PostgresOptions, RedisEngine, RedisOptions, WaitPolicy,
};

use super::Result;

/// A collection's plan and the engine that serves it.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) plan: CollectionPlan,
    pub(crate) engine: Instrumented<AnyEngine>,
    /// Which engine instance: collections with the same one can share an atomic batch.
    pub(crate) instance: Instance,
}

/// The engines of a cluster: where a node keeps the `local` collections.
#[derive(Debug, Clone)]
pub struct ClusterEngines {
    /// Leaderless replication (eventual collections).
    pub leaderless: Arc<dyn DynEngine>,
    /// Causal broadcast (causal collections), if the cluster runs it.
    pub causal: Option<Arc<dyn DynEngine>>,
    /// The Raft group (strong collections, and causal ones if there is no causal engine), if
    /// the cluster runs one.
    pub strong: Option<Arc<dyn DynEngine>>,
}

impl ClusterEngines {
    /// Whether every engine is the same one (a node reached over the network, which routes
    /// each record itself): a batch across them is one call to the node.
    fn one_remote(&self) -> bool {
        let same = |other: &Option<Arc<dyn DynEngine>>| {
            other.as_ref().is_none_or(|engine| {
                Arc::as_ptr(engine).cast::<()>() == Arc::as_ptr(&self.leaderless).cast::<()>()
            })
        };
        same(&self.strong) && same(&self.causal)
    }
}

/// Every route of a store: the named collections and the default one.
#[derive(Debug)]
pub(crate) struct Routes {
    named: HashMap<String, Route>,
    default: Route,
    /// Every engine instance opened, once each.
    engines: Vec<Instrumented<AnyEngine>>,
}

impl Routes {
    /// Opens the engines the configuration uses (and only those) and routes each collection.
    ///
    /// With `cluster`, collections on the `local` backend go to its engines instead: eventual
    /// ones to leaderless replication, causal ones to causal broadcast, strong ones to the
    /// Raft group (causal ones too when the cluster has no causal engine); their plans carry
    /// what the cluster delivers.
    pub(crate) async fn open(
        config: &Config,
        data_dir: &Path,
        clock: Arc<NodeClock>,
        metrics: EngineMetrics,
        cluster: Option<ClusterEngines>,
    ) -> Result<Self> {
        let mut engines = Engines {
            config,
            data_dir,
            clock,
            metrics: metrics.clone(),
            opened: HashMap::new(),
            in_cluster: cluster.is_some(),
            one_remote: cluster.as_ref().is_some_and(ClusterEngines::one_remote),
        };
        if let Some(cluster) = cluster {
            let mut add = |instance, engine: Arc<dyn DynEngine>| {
                let engine = AnyEngine::Dyn(engine);
                let backend = engine.backend();
                let measured = Instrumented::new(engine, backend, metrics.clone());
                engines.opened.insert(instance, measured);
            };
            add(Instance::Local, cluster.leaderless);
            if let Some(strong) = cluster.strong {
                add(Instance::Raft, strong);
            }
            if let Some(causal) = cluster.causal {
                add(Instance::Causal, causal);
            }
        }
        let default = engines.route("").await?;
        let mut named = HashMap::new();
        for name in config.collections.keys() {
            let route = engines.route(name).await?;
            named.insert(route.plan.name.clone(), route);
        }
        Ok(Self {
            named,
            default,
            engines: engines.opened.into_values().collect(),
        })
    }

    /// The route of `collection`.
    pub(crate) fn get(&self, collection: &str) -> &Route {
        self.named.get(collection).unwrap_or(&self.default)
    }

    /// Every engine instance the store opened, once each.
    pub(crate) fn engines(&self) -> &[Instrumented<AnyEngine>] {
        &self.engines
    }
}

/// Which engine instance a plan needs: Redis collections that must WAIT get their own
/// instance (with dedicated connections), the others share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Instance {
    Local,
    /// A cluster's Raft group.
    Raft,
    /// A cluster's causal broadcast.
    Causal,
    Redis {
        wait: bool,
    },
    Postgres,
}

struct Engines<'a> {
    config: &'a Config,
    data_dir: &'a Path,
    clock: Arc<NodeClock>,
    metrics: EngineMetrics,
    opened: HashMap<Instance, Instrumented<AnyEngine>>,
    /// Whether the `local` collections live in a cluster.
    in_cluster: bool,
    /// Whether one engine (a node reached over the network) serves both the leaderless and
    /// the Raft collections: a batch across them is one call to the node, which commits it.
    one_remote: bool,
}

impl Engines<'_> {
    /// The route of `collection`, opening its engine if no collection opened it yet.
    async fn route(&mut self, collection: &str) -> Result<Route> {
        let plan = self.plan(collection);
        let engine = self.for_plan(&plan).await?;
        let instance = match self.instance(&plan) {
            Instance::Raft | Instance::Causal if self.one_remote => Instance::Local,
            instance => instance,
        };
        Ok(Route {
            plan,
            engine,
            instance,
        })
    }

    /// The plan of `collection`, with the guarantee of the engine that will serve it.
    fn plan(&self, collection: &str) -> CollectionPlan {
        let mut plan = self.config.plan(collection);
        match self.instance(&plan) {
            Instance::Raft => plan.guarantee = self.config.raft_guarantee(),
            Instance::Causal => plan.guarantee = self.config.causal_guarantee(),
            Instance::Local if self.in_cluster => plan.guarantee = self.config.cluster_guarantee(),
            _ => {}
        }
        plan
    }

    /// The engine instance a plan needs. In a cluster, causal `local` collections go to its
    /// causal engine, strong ones (and causal ones if it has no causal engine) to its Raft
    /// group.
    fn instance(&self, plan: &CollectionPlan) -> Instance {
        match plan.backend {
            Backend::Local
                if plan.consistency == ConsistencyLevel::Causal
                    && self.opened.contains_key(&Instance::Causal) =>
            {
                Instance::Causal
            }
            Backend::Local
                if plan.consistency > ConsistencyLevel::Eventual
                    && self.opened.contains_key(&Instance::Raft) =>
            {
                Instance::Raft
            }
            Backend::Local => Instance::Local,
            Backend::Redis => Instance::Redis {
                wait: self
                    .config
                    .redis_wait(plan.backend, plan.consistency)
                    .is_some(),
            },
            Backend::Supabase => Instance::Postgres,
        }
    }

    async fn for_plan(&mut self, plan: &CollectionPlan) -> Result<Instrumented<AnyEngine>> {
        let instance = self.instance(plan);
        if let Some(engine) = self.opened.get(&instance) {
            return Ok(engine.clone());
        }
        let engine = self.open(instance).await?;
        let backend = engine.backend();
        let engine = Instrumented::new(engine, backend, self.metrics.clone());
        self.opened.insert(instance, engine.clone());
        Ok(engine)
    }

    async fn open(&self, instance: Instance) -> Result<AnyEngine> {
        let clock = Arc::clone(&self.clock);
        let missing = |block: &str| {
            super::StorageError::InvalidConfig(format!(
                "a collection uses {block} but storage.{block} is not set"
            ))
        };
        Ok(match instance {
            Instance::Raft | Instance::Causal => {
                return Err(super::StorageError::InvalidConfig(
                    "a cluster's engines are opened by the node, not by the store".into(),
                ));
            }
            Instance::Local => {
                let engine = LocalEngine::open(self.data_dir, clock)?;
                tracing::info!(data_dir = %self.data_dir.display(), "local engine open");
                AnyEngine::Local(engine)
            }
            Instance::Redis { wait } => {
                let redis = self.config.redis.as_ref().ok_or_else(|| missing("redis"))?;
                let wait = wait.then_some(WaitPolicy {
                    replicas: u64::from(redis.replicas),
                    timeout_ms: redis.wait_timeout_ms,
                });
                let options = RedisOptions {
                    wait,
                    metrics: Some(self.metrics.clone()),
                    read_replicas: redis.read_replicas.clone(),
                    ..RedisOptions::new(redis.url.clone())
                };
                AnyEngine::Redis(RedisEngine::connect(options, clock).await?)
            }
            Instance::Postgres => {
                let supabase = self
                    .config
                    .supabase
                    .as_ref()
                    .ok_or_else(|| missing("supabase"))?;
                let options = PostgresOptions {
                    metrics: Some(self.metrics.clone()),
                    isolation: match supabase.isolation_level {
                        IsolationLevel::Serializable => Isolation::Serializable,
                        IsolationLevel::ReadCommitted => Isolation::ReadCommitted,
                    },
                    pool_size: supabase.connection_pool_size as usize,
                    application_name: format!("agentstore-{}", self.config.node_id),
                    ..PostgresOptions::new(supabase.url.clone())
                };
                AnyEngine::Postgres(PostgresEngine::connect(options, clock).await?)
            }
        })
    }
}
