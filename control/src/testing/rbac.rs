//! Kubernetes RBAC evaluation, enough to check `deploy/10-rbac.yaml` against the calls the control plane makes
//! (recorded by the [`super::fake`] API): every call must be allowed, and every grant must be used, so the
//! manifests stay least-privilege as the code changes.
//!
//! Semantics follow the RBAC authorizer: a ClusterRoleBinding grants its ClusterRole's rules in every namespace
//! and for cluster-wide requests; a RoleBinding grants its Role's (or a ClusterRole's) rules in its own namespace
//! only; `*` matches any group, resource or verb. `resourceNames` are not supported (they cannot restrict
//! `list`, `watch` or `create`), and a rule using them is rejected so the check never overstates access.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

use super::fake::ApiCall;

/// Why the RBAC manifests could not be read or do not fit the calls.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// The YAML does not parse.
    #[error("RBAC manifests: {0}")]
    Yaml(String),
    /// A rule uses something this checker does not evaluate.
    #[error("RBAC rule of {role}: {reason}")]
    Unsupported {
        /// The role.
        role: String,
        /// What.
        reason: String,
    },
    /// Calls the RBAC does not allow.
    #[error("calls denied by RBAC (add a rule, or remove the call): {0:?}")]
    Denied(Vec<ApiCall>),
}

/// One permission: a verb on a group's resource, cluster-wide (`namespace: None`) or in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// API group (`""` core, `*` any).
    pub group: String,
    /// Resource with subresource (`*` any).
    pub resource: String,
    /// Verb (`*` any).
    pub verb: String,
    /// `None`: everywhere; `Some(ns)`: that namespace only.
    pub namespace: Option<String>,
}

impl Grant {
    fn allows(&self, c: &ApiCall) -> bool {
        let any = |pat: &str, v: &str| pat == "*" || pat == v;
        any(&self.group, &c.group)
            && any(&self.resource, &c.resource)
            && any(&self.verb, &c.verb)
            && match &self.namespace {
                None => true,
                Some(ns) => c.namespace.as_deref() == Some(ns.as_str()),
            }
    }
}

/// The permissions of one ServiceAccount, from a set of RBAC manifests.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Every grant, expanded.
    pub grants: BTreeSet<Grant>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

impl Rules {
    /// The grants of ServiceAccount `account` in `text` (a multi-document YAML of Roles, ClusterRoles and their
    /// bindings).
    pub fn parse(text: &str, account: &str) -> Result<Self, RbacError> {
        let mut docs = Vec::new();
        for de in serde_yaml::Deserializer::from_str(text) {
            let v = Value::deserialize(de).map_err(|e| RbacError::Yaml(e.to_string()))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        let s = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut out = Rules::default();
        for b in docs.iter().filter(|d| matches!(s(d, "/kind").as_str(), "RoleBinding" | "ClusterRoleBinding")) {
            let ours = b["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|sub| s(sub, "/kind") == "ServiceAccount" && s(sub, "/name") == account);
            if !ours {
                continue;
            }
            let binding_ns = (s(b, "/kind") == "RoleBinding").then(|| s(b, "/metadata/namespace"));
            let (role_kind, role_name) = (s(b, "/roleRef/kind"), s(b, "/roleRef/name"));
            let role = docs.iter().find(|d| {
                s(d, "/kind") == role_kind
                    && s(d, "/metadata/name") == role_name
                    && (role_kind == "ClusterRole" || Some(s(d, "/metadata/namespace")) == binding_ns)
            });
            let Some(role) = role else {
                return Err(RbacError::Unsupported {
                    role: role_name,
                    reason: format!("{role_kind} bound but not defined in the manifests"),
                });
            };
            let rules: Vec<Rule> =
                serde_json::from_value(role["rules"].clone()).map_err(|e| RbacError::Yaml(e.to_string()))?;
            for r in rules {
                if !r.resource_names.is_empty() {
                    return Err(RbacError::Unsupported {
                        role: role_name,
                        reason: "resourceNames are not evaluated".into(),
                    });
                }
                for group in &r.api_groups {
                    for resource in &r.resources {
                        for verb in &r.verbs {
                            out.grants.insert(Grant {
                                group: group.clone(),
                                resource: resource.clone(),
                                verb: verb.clone(),
                                namespace: binding_ns.clone(),
                            });
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether a call is allowed.
    pub fn allows(&self, call: &ApiCall) -> bool {
        self.grants.iter().any(|g| g.allows(call))
    }

    /// Checks every call; on success returns the grants no call used.
    pub fn check(&self, calls: &[ApiCall]) -> Result<Vec<Grant>, RbacError> {
        let mut denied: Vec<ApiCall> = calls.iter().filter(|c| !self.allows(c)).cloned().collect();
        if !denied.is_empty() {
            for c in &mut denied {
                c.client.clear();
            }
            denied.sort();
            denied.dedup();
            return Err(RbacError::Denied(denied));
        }
        Ok(self.grants.iter().filter(|g| !calls.iter().any(|c| g.allows(c))).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RBAC: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: read}
rules:
- apiGroups: [\"\"]
  resources: [services]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: read}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: read}
subjects: [{kind: ServiceAccount, name: sa, namespace: sys}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: lease, namespace: sys}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lease, namespace: sys}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: lease}
subjects: [{kind: ServiceAccount, name: sa, namespace: sys}]
";

    fn call(verb: &str, group: &str, resource: &str, ns: Option<&str>) -> ApiCall {
        ApiCall {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(Into::into),
            client: String::new(),
        }
    }

    #[test]
    fn bindings_scope_their_rules() {
        let r = Rules::parse(RBAC, "sa").unwrap();
        assert!(r.allows(&call("list", "", "services", None)));
        assert!(r.allows(&call("watch", "", "services", Some("any"))));
        assert!(!r.allows(&call("get", "", "services", None)));
        assert!(r.allows(&call("get", "coordination.k8s.io", "leases", Some("sys"))));
        assert!(!r.allows(&call("get", "coordination.k8s.io", "leases", Some("other"))));
        assert!(!r.allows(&call("get", "coordination.k8s.io", "leases", None)));
        assert!(Rules::parse(RBAC, "someone-else").unwrap().grants.is_empty());
        let unused = r.check(&[call("list", "", "services", None)]).unwrap();
        assert_eq!(unused.len(), 2, "{unused:?}");
        assert!(matches!(r.check(&[call("delete", "", "services", None)]), Err(RbacError::Denied(_))));
    }
}
