//! The Kubernetes examples (`deploy/k8s/`): the sidecar and the shared gateway, each against
//! the gateway.toml its ConfigMap or Secret carries.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use datafold_gateway::config::{CallerMode, Config};
use serde_yaml_ng::Value;

use super::parse::{
    at, int_at, is_true, list_at, lookup, memory_bytes, selects, str_at, yaml_documents,
};
use super::{key_file, parent, parse_config, read_deploy_file, CONFIG_PATH};

/// The container name of the gateway in both manifests.
const GATEWAY_CONTAINER: &str = "datafold-gateway";
const K8S_MANIFESTS: [&str; 2] = ["k8s/sidecar.yaml", "k8s/shared-gateway.yaml"];

/// One Kubernetes example: its documents and the gateway.toml its ConfigMap or Secret holds.
struct Manifest {
    file: &'static str,
    documents: Vec<Value>,
    /// The name of the ConfigMap or Secret holding gateway.toml.
    config_map: String,
    /// `ConfigMap` or `Secret`.
    config_kind: String,
    config: Config,
}

impl Manifest {
    fn load(file: &'static str) -> Self {
        let documents = yaml_documents(&format!("deploy/{file}"), &read_deploy_file(file));
        // A ConfigMap (`data`) or, where the caller list is kept from view, a Secret
        // (`stringData`).
        let held = |d: &Value| {
            let field = match d.get("kind").and_then(Value::as_str) {
                Some("ConfigMap") => "data",
                Some("Secret") => "stringData",
                _ => return None,
            };
            lookup(d, field)?
                .get("gateway.toml")?
                .as_str()
                .map(str::to_owned)
        };
        let holders: Vec<(&Value, String)> = documents
            .iter()
            .filter_map(|d| Some((d, held(d)?)))
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "{file}: one ConfigMap or Secret holds gateway.toml"
        );
        let (holder, text) = &holders[0];
        let config_kind = str_at(holder, "kind").to_owned();
        let source = format!("deploy/{file} ({config_kind} gateway.toml)");
        let config = parse_config(&source, text);
        let config_map = str_at(holder, "metadata.name").to_owned();
        Self {
            file,
            documents,
            config_map,
            config_kind,
            config,
        }
    }

    fn all(kind: &str, documents: &[Value]) -> Vec<Value> {
        documents
            .iter()
            .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
            .cloned()
            .collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        Self::all(kind, &self.documents)
    }

    fn one(&self, kind: &str) -> Value {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "{}: exactly one {kind}", self.file);
        found.into_iter().next().unwrap()
    }

    fn deployment(&self) -> Value {
        self.one("Deployment")
    }

    fn pod_spec(&self) -> Value {
        at(&self.deployment(), "spec.template.spec").clone()
    }

    fn pod_labels(&self) -> Value {
        at(&self.deployment(), "spec.template.metadata.labels").clone()
    }

    fn containers(&self) -> Vec<Value> {
        list_at(&self.pod_spec(), "containers").to_vec()
    }

    fn gateway(&self) -> Value {
        self.containers()
            .into_iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(GATEWAY_CONTAINER))
            .unwrap_or_else(|| panic!("{}: no `{GATEWAY_CONTAINER}` container", self.file))
    }

    fn volume(&self, name: &str) -> Value {
        list_at(&self.pod_spec(), "volumes")
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
            .cloned()
            .unwrap_or_else(|| panic!("{}: no volume `{name}`", self.file))
    }

    /// The gateway's mount at exactly `folder`, and the volume behind it.
    fn mount_at(&self, folder: &Path) -> (Value, Value) {
        let gateway = self.gateway();
        let mount = list_at(&gateway, "volumeMounts")
            .iter()
            .find(|m| m.get("mountPath").and_then(Value::as_str).map(Path::new) == Some(folder))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "{}: the gateway mounts nothing at {}",
                    self.file,
                    folder.display()
                )
            });
        let volume = self.volume(str_at(&mount, "name"));
        (mount, volume)
    }

    /// A port given by number or by the name of one of the gateway's container ports.
    fn resolve_port(&self, port: &Value) -> u16 {
        if let Some(number) = port.as_u64() {
            return u16::try_from(number).unwrap();
        }
        let name = port.as_str().expect("a port is a number or a name");
        let gateway = self.gateway();
        let found = list_at(&gateway, "ports")
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("{}: no container port named `{name}`", self.file));
        u16::try_from(int_at(found, "containerPort")).unwrap()
    }

    /// The configuration path the gateway container is started with.
    fn config_arg(&self) -> String {
        let gateway = self.gateway();
        let args: Vec<&str> = list_at(&gateway, "args")
            .iter()
            .chain(list_at(&gateway, "command"))
            .filter_map(Value::as_str)
            .collect();
        if let Some(i) = args.iter().position(|a| *a == "--config") {
            return args.get(i + 1).expect("--config has a value").to_string();
        }
        if let Some(path) = args.iter().find_map(|a| a.strip_prefix("--config=")) {
            return path.to_owned();
        }
        list_at(&gateway, "env")
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some("DATAFOLD_GATEWAY_CONFIG"))
            .map(|e| str_at(e, "value").to_owned())
            .unwrap_or_else(|| {
                panic!(
                    "{}: the gateway gets neither --config nor DATAFOLD_GATEWAY_CONFIG",
                    self.file
                )
            })
    }

    /// Checks that `file` is in a Secret mounted as a directory (no subPath) and names the
    /// Secret's entry; returns the volume's name.
    fn assert_secret_file(&self, file: &Path, what: &str) -> String {
        let (mount, volume) = self.mount_at(parent(file));
        let context = format!("{}: {what} {}", self.file, file.display());
        assert!(
            mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
            "{context}: a subPath mount never sees Secret updates"
        );
        assert!(is_true(&mount, "readOnly"), "{context}: mount it read-only");
        let secret = volume
            .get("secret")
            .unwrap_or_else(|| panic!("{context}: the volume is not a Secret"));
        let name = file.file_name().unwrap().to_str().unwrap();
        let items = list_at(secret, "items");
        if items.is_empty() {
            let secret_name = str_at(secret, "secretName");
            let in_file = self
                .of_kind("Secret")
                .into_iter()
                .find(|s| str_at(s, "metadata.name") == secret_name)
                .unwrap_or_else(|| {
                    panic!("{context}: without items, the Secret must be in the file")
                });
            let has_entry = ["data", "stringData"]
                .iter()
                .any(|field| lookup(&in_file, field).and_then(|d| d.get(name)).is_some());
            assert!(
                has_entry,
                "{context}: Secret `{secret_name}` has no `{name}`"
            );
        } else {
            assert!(
                items
                    .iter()
                    .any(|item| item.get("path").and_then(Value::as_str) == Some(name)),
                "{context}: no item of the Secret volume is projected as `{name}`"
            );
        }
        str_at(&volume, "name").to_owned()
    }
}

fn manifests() -> Vec<Manifest> {
    K8S_MANIFESTS.into_iter().map(Manifest::load).collect()
}

#[test]
fn k8s_config_maps_hold_configs_that_validate_and_read_the_key_from_a_file() {
    for manifest in manifests() {
        key_file(&manifest.config, manifest.file);
        assert!(
            manifest.config.audit.file.is_absolute(),
            "{}: the root filesystem is read-only, so the audit file needs an absolute path on a volume",
            manifest.file
        );
    }
}

#[test]
fn k8s_gateway_container_ports_are_the_listen_and_admin_ports() {
    for manifest in manifests() {
        let gateway = manifest.gateway();
        let ports: BTreeSet<u16> = list_at(&gateway, "ports")
            .iter()
            .map(|p| u16::try_from(int_at(p, "containerPort")).unwrap())
            .collect();
        let wanted = BTreeSet::from([
            manifest.config.listen.addr.port(),
            manifest.config.admin.addr.port(),
        ]);
        assert_eq!(ports, wanted, "{}", manifest.file);
    }
}

#[test]
fn k8s_probes_ask_healthz_and_readyz_on_an_admin_port_the_kubelet_can_reach() {
    for manifest in manifests() {
        let admin = manifest.config.admin.addr;
        assert!(
            admin.ip().is_unspecified(),
            "{}: admin.addr {admin} must listen on every interface for the kubelet",
            manifest.file
        );
        let gateway = manifest.gateway();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = at(&gateway, &format!("{probe}.httpGet"));
            assert_eq!(str_at(get, "path"), path, "{}: {probe}", manifest.file);
            assert_eq!(
                manifest.resolve_port(at(get, "port")),
                admin.port(),
                "{}: {probe} port",
                manifest.file
            );
            assert_ne!(
                get.get("scheme").and_then(Value::as_str),
                Some("HTTPS"),
                "{}: the admin listener is plain HTTP",
                manifest.file
            );
        }
    }
}

#[test]
fn k8s_config_map_is_mounted_where_the_gateway_is_told_to_read_it() {
    for manifest in manifests() {
        let config_arg = manifest.config_arg();
        assert_eq!(config_arg, CONFIG_PATH, "{}", manifest.file);
        let path = Path::new(&config_arg);
        let (mount, volume) = manifest.mount_at(parent(path));
        assert!(
            mount.get("subPath").is_none(),
            "{}: a subPath mount never sees ConfigMap updates",
            manifest.file
        );
        let mounted = match manifest.config_kind.as_str() {
            "Secret" => str_at(&volume, "secret.secretName"),
            _ => str_at(&volume, "configMap.name"),
        };
        assert_eq!(
            mounted, manifest.config_map,
            "{}: the mounted volume is the one holding gateway.toml",
            manifest.file
        );
        assert_eq!(
            path.file_name().unwrap(),
            "gateway.toml",
            "{}: --config names the ConfigMap entry",
            manifest.file
        );
    }
}

#[test]
fn k8s_key_file_is_in_a_secret_directory_mount_that_only_the_gateway_sees() {
    for manifest in manifests() {
        let key = key_file(&manifest.config, manifest.file);
        let volume = manifest.assert_secret_file(&key, "api_key.file");
        for container in manifest.containers() {
            let name = str_at(&container, "name");
            if name == GATEWAY_CONTAINER {
                continue;
            }
            assert!(
                list_at(&container, "volumeMounts")
                    .iter()
                    .all(|m| m.get("name").and_then(Value::as_str) != Some(volume.as_str())),
                "{}: container `{name}` mounts the key",
                manifest.file
            );
            assert!(
                list_at(&container, "env")
                    .iter()
                    .all(|e| e.get("name").and_then(Value::as_str) != Some("DATAFOLD_API_KEY")),
                "{}: container `{name}` gets the key in its environment",
                manifest.file
            );
        }
    }
}

#[test]
fn k8s_audit_file_is_on_a_writable_volume() {
    for manifest in manifests() {
        let audit = &manifest.config.audit.file;
        let (mount, volume) = manifest.mount_at(parent(audit));
        assert!(
            !is_true(&mount, "readOnly"),
            "{}: the audit folder is mounted read-only",
            manifest.file
        );
        assert!(
            volume.get("emptyDir").is_some() || volume.get("persistentVolumeClaim").is_some(),
            "{}: the audit folder must be an emptyDir or a persistent volume",
            manifest.file
        );
    }
}

#[test]
fn k8s_termination_grace_outlasts_shutdown_grace_and_any_pre_stop_pause() {
    for manifest in manifests() {
        let pod = manifest.pod_spec();
        let grace = Duration::from_secs(
            u64::try_from(int_at(&pod, "terminationGracePeriodSeconds")).unwrap(),
        );
        let pause = lookup(&manifest.gateway(), "lifecycle.preStop.sleep.seconds")
            .map(|s| Duration::from_secs(s.as_u64().unwrap()))
            .unwrap_or_default();
        let needed = manifest.config.limits.shutdown_grace + pause;
        assert!(
            grace > needed,
            "{}: terminationGracePeriodSeconds {grace:?} <= shutdown_grace + preStop {needed:?}",
            manifest.file
        );
    }
}

#[test]
fn k8s_gateway_runs_as_non_root_with_a_read_only_root_and_no_capabilities() {
    for manifest in manifests() {
        let gateway = manifest.gateway();
        let pod = manifest.pod_spec();
        let context = at(&gateway, "securityContext");
        let file = manifest.file;
        assert!(
            is_true(context, "runAsNonRoot") || is_true(&pod, "securityContext.runAsNonRoot"),
            "{file}: runAsNonRoot"
        );
        if let Some(user) = lookup(context, "runAsUser") {
            assert_ne!(user.as_u64(), Some(0), "{file}: runAsUser 0");
        }
        assert!(
            is_true(context, "readOnlyRootFilesystem"),
            "{file}: readOnlyRootFilesystem"
        );
        assert_eq!(
            lookup(context, "allowPrivilegeEscalation").and_then(Value::as_bool),
            Some(false),
            "{file}: allowPrivilegeEscalation"
        );
        assert!(
            list_at(context, "capabilities.drop")
                .iter()
                .any(|c| c.as_str() == Some("ALL")),
            "{file}: capabilities.drop ALL"
        );
        assert!(
            list_at(context, "capabilities.add").is_empty(),
            "{file}: no capability is needed"
        );
    }
}

#[test]
fn k8s_gateway_requests_cpu_and_memory_under_a_memory_limit() {
    for manifest in manifests() {
        let gateway = manifest.gateway();
        let resources = at(&gateway, "resources");
        str_at(resources, "requests.cpu");
        let request = memory_bytes(str_at(resources, "requests.memory"));
        let limit = memory_bytes(str_at(resources, "limits.memory"));
        assert!(
            request <= limit,
            "{}: memory request {request} over its limit {limit}",
            manifest.file
        );
        // The benchmark's peak RSS under load was 15-25 MiB: the request must cover it.
        assert!(
            request >= 25 << 20,
            "{}: request below the benchmark's peak",
            manifest.file
        );
    }
}

#[test]
fn k8s_deployment_selector_matches_its_pod_labels() {
    for manifest in manifests() {
        let deployment = manifest.deployment();
        assert!(
            selects(
                at(&deployment, "spec.selector.matchLabels"),
                &manifest.pod_labels()
            ),
            "{}",
            manifest.file
        );
    }
}

#[test]
fn sidecar_listener_is_on_loopback_so_only_the_pod_reaches_it() {
    let manifest = Manifest::load("k8s/sidecar.yaml");
    let listen: SocketAddr = manifest.config.listen.addr;
    assert!(listen.ip().is_loopback(), "listen.addr {listen}");
    assert_eq!(manifest.config.callers.mode, CallerMode::Open);
    assert!(
        manifest.containers().len() >= 2,
        "the app and the gateway share the Pod"
    );
}

fn shared() -> Manifest {
    Manifest::load("k8s/shared-gateway.yaml")
}

#[test]
fn shared_gateway_listens_on_the_pod_network_and_authenticates_callers() {
    let manifest = shared();
    let listen = manifest.config.listen.addr;
    assert!(listen.ip().is_unspecified(), "listen.addr {listen}");
    assert_eq!(manifest.config.callers.mode, CallerMode::Token);
    assert!(!manifest.config.callers.tokens.is_empty());
}

#[test]
fn shared_gateway_runs_two_replicas_and_a_budget_keeps_one() {
    let manifest = shared();
    let replicas = int_at(&manifest.deployment(), "spec.replicas");
    assert!(replicas >= 2, "replicas {replicas}");
    let budget = manifest.one("PodDisruptionBudget");
    let min_available = int_at(&budget, "spec.minAvailable");
    assert!(
        (1..replicas).contains(&min_available),
        "minAvailable {min_available} must keep one Pod and still let a node drain"
    );
    assert!(selects(
        at(&budget, "spec.selector.matchLabels"),
        &manifest.pod_labels()
    ));
}

#[test]
fn shared_service_selects_the_pods_and_targets_the_listen_port() {
    let manifest = shared();
    let service = manifest.one("Service");
    assert!(selects(
        at(&service, "spec.selector"),
        &manifest.pod_labels()
    ));
    let targets: Vec<u16> = list_at(&service, "spec.ports")
        .iter()
        .map(|p| manifest.resolve_port(p.get("targetPort").unwrap_or(at(p, "port"))))
        .collect();
    assert_eq!(targets, [manifest.config.listen.addr.port()]);
}

#[test]
fn shared_network_policy_admits_only_labelled_callers_to_the_listen_port() {
    let manifest = shared();
    let policy = manifest.one("NetworkPolicy");
    assert!(selects(
        at(&policy, "spec.podSelector.matchLabels"),
        &manifest.pod_labels()
    ));
    assert!(list_at(&policy, "spec.policyTypes")
        .iter()
        .any(|t| t.as_str() == Some("Ingress")));
    let rules = list_at(&policy, "spec.ingress");
    let admits = |port: u16| {
        rules
            .iter()
            .filter(|rule| {
                list_at(rule, "ports")
                    .iter()
                    .any(|p| manifest.resolve_port(at(p, "port")) == port)
            })
            .collect::<Vec<_>>()
    };
    let listen_rules = admits(manifest.config.listen.addr.port());
    assert!(!listen_rules.is_empty(), "no rule admits callers");
    for rule in listen_rules {
        let peers = list_at(rule, "from");
        assert!(!peers.is_empty(), "a rule admits anyone to the listen port");
        for peer in peers {
            let labelled = ["namespaceSelector", "podSelector"].iter().any(|s| {
                lookup(peer, &format!("{s}.matchLabels"))
                    .is_some_and(|m| m.as_mapping().is_some_and(|m| !m.is_empty()))
            });
            assert!(labelled, "peer {peer:?} is not limited by a label");
        }
    }
    assert!(
        !admits(manifest.config.admin.addr.port()).is_empty(),
        "the admin port is closed to probes and monitoring"
    );
}

#[test]
fn shared_listener_tls_files_come_from_secret_directory_mounts() {
    let manifest = shared();
    let listen = &manifest.config.listen;
    let (cert, key) = (
        listen.tls_cert.as_ref().expect("listen.tls_cert"),
        listen.tls_key.as_ref().expect("listen.tls_key"),
    );
    manifest.assert_secret_file(cert, "listen.tls_cert");
    manifest.assert_secret_file(key, "listen.tls_key");
}
