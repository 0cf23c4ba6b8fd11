//! The deployment artifacts in `deploy/` against the configurations they ship.
//!
//! Each Kubernetes manifest carries its gateway.toml in a ConfigMap (or, for the shared gateway, a Secret), the Dockerfile bakes one in
//! and the systemd unit comes with one; these tests parse both sides (YAML, Dockerfile lines,
//! unit INI lines, and the TOML through `Config::parse`) and check that ports, paths, probes and
//! timeouts agree, so that neither side can be edited without the other.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use datafold_gateway::config::{ApiKeySource, CallerMode, Config};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// Where every shipped artifact tells the gateway to read its configuration.
const CONFIG_PATH: &str = "/etc/datafold-gateway/gateway.toml";
/// The container name of the gateway in both manifests.
const GATEWAY_CONTAINER: &str = "datafold-gateway";
const K8S_MANIFESTS: [&str; 2] = ["k8s/sidecar.yaml", "k8s/shared-gateway.yaml"];
const DOCKERFILE: &str = "Dockerfile";
const UNIT: &str = "systemd/datafold-gateway.service";
const UNIT_CONFIG: &str = "systemd/gateway.toml";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_repo_file(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn read_deploy_file(relative: &str) -> String {
    read_repo_file(&format!("deploy/{relative}"))
}

fn parse_config(source: &str, text: &str) -> Config {
    Config::parse(Path::new(source), text).unwrap_or_else(|e| panic!("{e}"))
}

fn key_file(config: &Config, source: &str) -> PathBuf {
    match &config.api_key {
        ApiKeySource::File(path) => path.clone(),
        other => panic!("{source}: the key must come from a file, not {other:?}"),
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .unwrap_or_else(|| panic!("{} has no folder", path.display()))
}

// ---- YAML -------------------------------------------------------------------------------------

/// Every non-empty document of a multi-document YAML file.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read_deploy_file(relative);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|e| panic!("deploy/{relative}: {e}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The value at a dotted path of mapping keys, if every step is there.
fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |value, key| value.get(key))
}

fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    lookup(value, path).unwrap_or_else(|| panic!("`{path}` is missing"))
}

fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn int_at(value: &Value, path: &str) -> i64 {
    at(value, path)
        .as_i64()
        .unwrap_or_else(|| panic!("`{path}` is not an integer"))
}

fn list_at<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    lookup(value, path)
        .map(|v| {
            v.as_sequence()
                .unwrap_or_else(|| panic!("`{path}` is not a list"))
                .as_slice()
        })
        .unwrap_or(&[])
}

fn is_true(value: &Value, path: &str) -> bool {
    lookup(value, path).and_then(Value::as_bool) == Some(true)
}

/// Whether a `matchLabels` selector is non-empty and every one of its labels is on `labels`.
fn selects(match_labels: &Value, labels: &Value) -> bool {
    let Some(wanted) = match_labels.as_mapping() else {
        return false;
    };
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Kubernetes memory quantity (`32Mi`, `1Gi`, `128M`) in bytes.
fn memory_bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    let (number, scale) = units
        .iter()
        .find_map(|(suffix, scale)| Some((quantity.strip_suffix(suffix)?, *scale)))
        .unwrap_or((quantity, 1));
    number
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("`{quantity}` is not a memory quantity"))
        * scale
}

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
        let documents = yaml_documents(file);
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

// ---- Dockerfile -------------------------------------------------------------------------------

/// One Dockerfile instruction, continuation lines joined, in the stage (0-based) it belongs to.
struct Instruction {
    stage: usize,
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = read_deploy_file(DOCKERFILE);
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends in a continuation");
    let mut stage = None;
    logical
        .into_iter()
        .map(|line| {
            let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            if keyword == "FROM" {
                stage = Some(stage.map_or(0, |s| s + 1));
            }
            Instruction {
                stage: stage.expect("the Dockerfile starts with FROM"),
                keyword,
                args: args.trim().to_owned(),
            }
        })
        .collect()
}

fn final_stage(instructions: &[Instruction]) -> Vec<&Instruction> {
    let last = instructions.last().expect("an empty Dockerfile").stage;
    instructions.iter().filter(|i| i.stage == last).collect()
}

/// The words of an exec-form (`["a", "b"]`) or shell-form argument list.
fn docker_words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("`{args}`: {e}"))
    } else {
        args.split_whitespace().map(str::to_owned).collect()
    }
}

/// `COPY [--flag=value ...] source... dest`: its flags, sources and destination.
fn docker_copy(args: &str) -> (Vec<String>, Vec<String>, String) {
    let words = docker_words(args);
    let (flags, mut paths): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let dest = paths.pop().expect("COPY has a destination");
    (flags, paths, dest)
}

/// The user the final stage runs as, numerically.
fn docker_user(stage: &[&Instruction]) -> u32 {
    let user = stage
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("the final stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    uid.parse()
        .unwrap_or_else(|_| panic!("USER {uid}: use a numeric id so runAsNonRoot can verify it"))
}

/// The configuration the final stage copies to CONFIG_PATH, from the build context.
fn baked_config() -> (String, Config) {
    let instructions = dockerfile();
    let source = final_stage(&instructions)
        .into_iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| docker_copy(&i.args))
        .find(|(flags, _, dest)| {
            dest == CONFIG_PATH && flags.iter().all(|f| !f.starts_with("--from"))
        })
        .map(|(_, sources, _)| sources.into_iter().next().unwrap())
        .unwrap_or_else(|| panic!("the final stage copies no configuration to {CONFIG_PATH}"));
    let config = parse_config(&source, &read_repo_file(&source));
    (source, config)
}

#[test]
fn dockerfile_builds_a_locked_release_binary() {
    let instructions = dockerfile();
    let first = instructions.first().unwrap();
    assert!(
        first.args.starts_with("rust:"),
        "build stage FROM {}",
        first.args
    );
    assert!(instructions
        .iter()
        .filter(|i| i.stage == 0 && i.keyword == "RUN")
        .any(|i| i.args.contains("cargo build --release --locked")));
}

#[test]
fn dockerfile_final_stage_is_distroless_and_runs_as_a_numeric_non_root_user() {
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    assert!(
        stage[0].args.starts_with("gcr.io/distroless/"),
        "final FROM {}",
        stage[0].args
    );
    assert_ne!(docker_user(&stage), 0, "USER root");
}

#[test]
fn dockerfile_starts_the_gateway_with_the_config_it_bakes_in() {
    let (source, config) = baked_config();
    key_file(&config, &source);
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    let mut named = 0;
    for env in stage.iter().filter(|i| i.keyword == "ENV") {
        if let Some(value) = env.args.strip_prefix("DATAFOLD_GATEWAY_CONFIG=") {
            assert_eq!(value, CONFIG_PATH, "ENV DATAFOLD_GATEWAY_CONFIG");
            named += 1;
        }
    }
    for start in stage
        .iter()
        .filter(|i| i.keyword == "CMD" || i.keyword == "ENTRYPOINT")
    {
        let words = docker_words(&start.args);
        if let Some(i) = words.iter().position(|w| w == "--config") {
            assert_eq!(words[i + 1], CONFIG_PATH, "{} --config", start.keyword);
            named += 1;
        }
    }
    assert!(
        named > 0,
        "neither ENV nor CMD/ENTRYPOINT names {CONFIG_PATH}"
    );
}

#[test]
fn dockerfile_exposes_the_listen_and_admin_ports_of_its_config() {
    let (_, config) = baked_config();
    let instructions = dockerfile();
    let exposed: BTreeSet<u16> = final_stage(&instructions)
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    for (key, addr) in [("listen", config.listen.addr), ("admin", config.admin.addr)] {
        assert!(
            exposed.contains(&addr.port()),
            "{key}.addr {addr} not exposed"
        );
        assert!(
            addr.ip().is_unspecified(),
            "{key}.addr {addr}: a container's loopback is unreachable from outside it"
        );
    }
}

#[test]
fn dockerfile_gives_the_runtime_user_its_audit_folder() {
    let (_, config) = baked_config();
    let folder = parent(&config.audit.file);
    assert!(
        folder.is_absolute(),
        "audit.file {}",
        config.audit.file.display()
    );
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    let uid = docker_user(&stage);
    let owned = stage
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| docker_copy(&i.args))
        .any(|(flags, _, dest)| {
            Path::new(&dest) == folder
                && flags
                    .iter()
                    .any(|f| f.starts_with(&format!("--chown={uid}")))
        });
    assert!(
        owned,
        "the final stage creates no {} owned by {uid}",
        folder.display()
    );
}

/// Whether a `.dockerignore` pattern list lets `path` (relative to the context) through: the
/// last pattern matching the path or one of its folders decides. Patterns are `*` globs per
/// path segment, optionally negated with `!`.
fn docker_context_admits(patterns: &[&str], path: &str) -> bool {
    let segment_matches = |pattern: &str, segment: &str| match pattern.split_once('*') {
        None => pattern == segment,
        Some((head, tail)) => {
            assert!(
                !tail.contains('*'),
                "pattern `{pattern}` is beyond this test"
            );
            segment.len() >= head.len() + tail.len()
                && segment.starts_with(head)
                && segment.ends_with(tail)
        }
    };
    let segments: Vec<&str> = path.split('/').collect();
    let mut admitted = true;
    for pattern in patterns {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, *pattern),
        };
        let parts: Vec<&str> = pattern.trim_matches('/').split('/').collect();
        let matches = parts.len() <= segments.len()
            && parts
                .iter()
                .zip(&segments)
                .all(|(p, s)| segment_matches(p, s));
        if matches {
            admitted = negated;
        }
    }
    admitted
}

#[test]
fn dockerfile_context_filter_admits_what_cargo_needs_and_keeps_target_out() {
    let ignore = read_deploy_file("Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let (config_source, _) = baked_config();
    let mut needed = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "src/main.rs".to_owned(),
        "src/lib.rs".to_owned(),
        config_source,
    ];
    // Targets declared in Cargo.toml must exist for cargo to read the manifest at all.
    let manifest: toml::Table = read_repo_file("Cargo.toml").parse().unwrap();
    for (section, folder) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        let targets = manifest.get(section).and_then(|t| t.as_array());
        for target in targets.into_iter().flatten() {
            let path = match target.get("path").and_then(|p| p.as_str()) {
                Some(path) => path.to_owned(),
                None => format!("{folder}/{}.rs", target["name"].as_str().unwrap()),
            };
            needed.push(path);
        }
    }
    for path in &needed {
        assert!(
            docker_context_admits(&patterns, path),
            "Dockerfile.dockerignore keeps out {path}"
        );
    }
    for path in [
        "target/release/datafold-gateway",
        ".git/HEAD",
        "audit.jsonl",
    ] {
        assert!(
            !docker_context_admits(&patterns, path),
            "Dockerfile.dockerignore lets in {path}"
        );
    }
}

// ---- systemd ----------------------------------------------------------------------------------

/// A unit file as (section, key, value) assignments, in order.
struct Unit(Vec<(String, String, String)>);

impl Unit {
    fn load() -> Self {
        let text = read_deploy_file(UNIT);
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "continuation lines are beyond this test: {line}"
            );
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not an assignment: {line}"));
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
        Self(entries)
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The effective value of a single-valued [Service] key: its last assignment.
    fn get(&self, key: &str) -> &str {
        self.all(key)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("{UNIT}: no {key}="))
    }

    fn name() -> &'static str {
        Path::new(UNIT).file_name().unwrap().to_str().unwrap()
    }
}

fn unit_config() -> Config {
    parse_config(
        &format!("deploy/{UNIT_CONFIG}"),
        &read_deploy_file(UNIT_CONFIG),
    )
}

/// A systemd time span: bare seconds or humantime units (`45s`, `1min 30s`).
fn systemd_span(value: &str) -> Duration {
    match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(value)
            .unwrap_or_else(|e| panic!("`{value}` is not a time span: {e}")),
    }
}

#[test]
fn systemd_credential_lands_where_the_config_reads_the_key() {
    let unit = Unit::load();
    let config = unit_config();
    let key = key_file(&config, UNIT_CONFIG);
    let credentials: Vec<(&str, &str)> = unit
        .all("LoadCredential")
        .into_iter()
        .map(|c| c.split_once(':').expect("LoadCredential=NAME:PATH"))
        .collect();
    let expected: Vec<PathBuf> = credentials
        .iter()
        .map(|(name, _)| Path::new("/run/credentials").join(Unit::name()).join(name))
        .collect();
    assert!(
        expected.contains(&key),
        "api_key.file {} is none of the unit's credentials {expected:?}",
        key.display()
    );
    for (_, source) in credentials {
        assert!(
            Path::new(source).is_absolute(),
            "LoadCredential source {source}"
        );
    }
}

#[test]
fn systemd_exec_start_serves_the_shipped_config_path() {
    let unit = Unit::load();
    let words: Vec<&str> = unit.get("ExecStart").split_whitespace().collect();
    assert!(Path::new(words[0]).is_absolute(), "ExecStart {}", words[0]);
    assert_eq!(words.get(1), Some(&"serve"));
    let i = words
        .iter()
        .position(|w| *w == "--config")
        .expect("ExecStart passes --config");
    assert_eq!(words[i + 1], CONFIG_PATH);
    unit_config();
}

#[test]
fn systemd_audit_file_is_inside_the_logs_or_state_directory() {
    let unit = Unit::load();
    let config = unit_config();
    let mut folders = Vec::new();
    for (key, base) in [
        ("LogsDirectory", "/var/log"),
        ("StateDirectory", "/var/lib"),
    ] {
        for value in unit.all(key) {
            folders.extend(
                value
                    .split_whitespace()
                    .map(|d| Path::new(base).join(d.split(':').next().unwrap())),
            );
        }
    }
    assert!(
        folders.iter().any(|f| config.audit.file.starts_with(f)),
        "audit.file {} is outside {folders:?}, the only folders the unit may write",
        config.audit.file.display()
    );
}

#[test]
fn systemd_reload_sends_sighup_to_the_main_process() {
    let unit = Unit::load();
    let words: Vec<&str> = unit.get("ExecReload").split_whitespace().collect();
    assert!(words[0].ends_with("/kill"), "ExecReload {words:?}");
    assert!(words.contains(&"-HUP") || words.contains(&"-SIGHUP"));
    assert!(words.contains(&"$MAINPID"));
}

#[test]
fn systemd_stop_timeout_outlasts_shutdown_grace() {
    let unit = Unit::load();
    let config = unit_config();
    let timeout = systemd_span(unit.get("TimeoutStopSec"));
    assert!(
        timeout > config.limits.shutdown_grace,
        "TimeoutStopSec {timeout:?} <= shutdown_grace {:?}",
        config.limits.shutdown_grace
    );
}

#[test]
fn systemd_unit_is_hardened_and_restarts_on_failure() {
    let unit = Unit::load();
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(unit.get(key), value, "{key}=");
    }
    assert!(unit.all("SystemCallFilter").contains(&"@system-service"));
}

#[test]
fn systemd_config_keeps_the_open_listener_on_loopback() {
    let config = unit_config();
    assert_eq!(config.callers.mode, CallerMode::Open);
    assert!(
        config.listen.addr.ip().is_loopback(),
        "{}",
        config.listen.addr
    );
}
