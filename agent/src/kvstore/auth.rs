//! Applies an [`AuthPlan`] to an etcd through its Auth API, idempotently: missing roles and
//! users are created (without passwords: with `--client-cert-auth` etcd takes the user name
//! from the client certificate's CN), grants and role memberships are made exactly the plan's,
//! stale managed users are removed, and authentication is enabled last.
//!
//! On a store that never had authentication (no `root` user yet), every key and lease that
//! exists once authentication is on was written by someone nobody authorised (any holder of a
//! client certificate during the start-up window), so they are deleted: strait's writers
//! publish again when their lease goes. The `root` user is created right before enabling, so
//! "root exists" means "authentication was enabled" except after a crash between those two
//! calls.

use etcd_client::{
    DeleteOptions, Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions,
};

use super::client::EtcdClient;
use super::error::Result;
use crate::wire::users::{Access, AuthPlan, Grant, KeyRange, ROOT_ROLE, ROOT_USER};

/// What [`apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AuthReport {
    pub roles_created: Vec<String>,
    pub users_created: Vec<String>,
    pub users_removed: Vec<String>,
    pub grants_added: usize,
    pub grants_revoked: usize,
    pub role_memberships_changed: usize,
    /// The store had no `root` user: authentication was off until this run.
    pub first_enable: bool,
    /// Keys and leases deleted after the first enable.
    pub purged_keys: i64,
    pub purged_leases: usize,
}

impl AuthReport {
    /// Whether the run changed nothing (a second run of the same plan).
    pub fn unchanged(&self) -> bool {
        *self == Self::default()
    }
}

fn permission_type(access: Access) -> PermissionType {
    match access {
        Access::Read => PermissionType::Read,
        Access::ReadWrite => PermissionType::Readwrite,
    }
}

fn grant_of(p: &Permission) -> Option<Grant> {
    let access = match PermissionType::try_from(p.get_type()).ok()? {
        PermissionType::Read => Access::Read,
        PermissionType::Readwrite => Access::ReadWrite,
        // Write-only is never part of a plan: revoke it.
        PermissionType::Write => return None,
    };
    Some(Grant {
        access,
        range: KeyRange {
            start: p.key().to_vec(),
            end: p.range_end().to_vec(),
        },
    })
}

/// Makes the etcd's users and roles those of `plan` and enables authentication. The client
/// must be allowed to use the Auth API: any client while authentication is off, a user with
/// the `root` role after (e.g. `admin-<cluster>`).
pub async fn apply(client: &EtcdClient, plan: &AuthPlan) -> Result<AuthReport> {
    let mut auth = client.raw().auth_client();
    let mut report = AuthReport::default();

    let roles = client.call("role-list", "", auth.role_list()).await?;
    let existing_roles: Vec<String> = roles.roles().to_vec();
    for role in &plan.roles {
        if !existing_roles.contains(&role.name) {
            client
                .call("role-add", &role.name, auth.role_add(role.name.clone()))
                .await?;
            report.roles_created.push(role.name.clone());
        }
        let current = client
            .call("role-get", &role.name, auth.role_get(role.name.clone()))
            .await?;
        let current: Vec<(Permission, Option<Grant>)> = current
            .permissions()
            .into_iter()
            .map(|p| {
                let g = grant_of(&p);
                (p, g)
            })
            .collect();
        // Revoke first what the plan does not hold (also a range held with the other access:
        // etcd keys a permission by its range, so granting it again would just overwrite).
        for (perm, grant) in &current {
            if grant.as_ref().is_some_and(|g| role.grants.contains(g)) {
                continue;
            }
            let opts = RoleRevokePermissionOptions::new().with_range_end(perm.range_end().to_vec());
            client
                .call(
                    "role-revoke-permission",
                    &role.name,
                    auth.role_revoke_permission(role.name.clone(), perm.key().to_vec(), Some(opts)),
                )
                .await?;
            report.grants_revoked += 1;
        }
        for grant in &role.grants {
            if current.iter().any(|(_, g)| g.as_ref() == Some(grant)) {
                continue;
            }
            let perm = Permission::new(permission_type(grant.access), grant.range.start.clone())
                .with_range_end(grant.range.end.clone());
            client
                .call(
                    "role-grant-permission",
                    &role.name,
                    auth.role_grant_permission(role.name.clone(), perm),
                )
                .await?;
            report.grants_added += 1;
        }
    }

    let users = client.call("user-list", "", auth.user_list()).await?;
    let existing_users: Vec<String> = users.users().to_vec();
    report.first_enable = !existing_users.iter().any(|u| u == ROOT_USER);
    // Root last: its existence marks authentication as enabled (see the module docs).
    let (root, others): (Vec<_>, Vec<_>) = plan.users.iter().partition(|u| u.name == ROOT_USER);
    for user in others.into_iter().chain(root) {
        if !existing_users.contains(&user.name) {
            client
                .call(
                    "user-add",
                    &user.name,
                    auth.user_add(
                        user.name.clone(),
                        "",
                        Some(UserAddOptions::new().with_no_pwd()),
                    ),
                )
                .await?;
            report.users_created.push(user.name.clone());
        }
        let current = client
            .call("user-get", &user.name, auth.user_get(user.name.clone()))
            .await?;
        let current: Vec<String> = current.roles().to_vec();
        for role in current.iter().filter(|r| !user.roles.contains(r)) {
            // etcd refuses to take `root` from `root` while authentication is on; the plan
            // always keeps it there.
            client
                .call(
                    "user-revoke-role",
                    &user.name,
                    auth.user_revoke_role(user.name.clone(), role.clone()),
                )
                .await?;
            report.role_memberships_changed += 1;
        }
        for role in user.roles.iter().filter(|r| !current.contains(r)) {
            client
                .call(
                    "user-grant-role",
                    &user.name,
                    auth.user_grant_role(user.name.clone(), role.clone()),
                )
                .await?;
            report.role_memberships_changed += 1;
        }
    }
    for stale in existing_users.iter().filter(|u| {
        plan.user(u).is_none()
            && plan
                .managed_user_prefixes
                .iter()
                .any(|p| u.starts_with(p.as_str()))
    }) {
        client
            .call("user-delete", stale, auth.user_delete(stale.clone()))
            .await?;
        report.users_removed.push(stale.clone());
    }

    debug_assert!(
        plan.user(ROOT_USER)
            .is_some_and(|u| u.roles.iter().any(|r| r == ROOT_ROLE))
    );
    // A no-op when already enabled.
    client.call("auth-enable", "", auth.auth_enable()).await?;

    if report.first_enable {
        let mut kv = client.raw().kv_client();
        let deleted = client
            .call(
                "delete-all",
                "",
                kv.delete("", Some(DeleteOptions::new().with_all_keys())),
            )
            .await?;
        report.purged_keys = deleted.deleted();
        let mut lease = client.raw().lease_client();
        let leases = client.call("lease-leases", "", lease.leases()).await?;
        for l in leases.leases() {
            client
                .call(
                    "lease-revoke",
                    &format!("lease {:x}", l.id()),
                    lease.revoke(l.id()),
                )
                .await?;
            report.purged_leases += 1;
        }
        tracing::warn!(
            keys = report.purged_keys,
            leases = report.purged_leases,
            "etcd authentication enabled: deleted every key and lease written before it"
        );
    }
    Ok(report)
}
