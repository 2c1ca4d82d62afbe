//! `fleetgate ca ...`: making a CA with its root kept offline and its keys
//! in a token, and the root ceremonies that follow (see
//! `provisioning::ceremony`).

use provisioning::ceremony::{self, RootDir};
use provisioning::keys::{Custody, Pin, TokenUri};
use provisioning::registry::Listed;
use provisioning::{Authority, InitOptions};

use super::*;

#[derive(Subcommand, Debug)]
pub(super) enum CaCmd {
    /// Create a CA and a data dir ready to serve, with the root's key kept
    /// offline in ROOT_OUT (never in the data dir) and, with --ca-key-uri,
    /// the issuing CA's and signers' keys made in a PKCS#11 token.
    Init {
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "fleetgate-data")]
        data_dir: PathBuf,
        /// Where the root's key and a copy of its certificate go: a dir
        /// that leaves with the root (a USB stick, a safe). Without it the
        /// root stays in the data dir, as `serve` makes it.
        #[arg(long)]
        root_out: Option<PathBuf>,
        /// The issuing CA's key in a token, RFC 7512:
        /// 'pkcs11:token=LABEL;object=issuing-ca?module-path=/usr/lib/softhsm/libsofthsm2.so'.
        /// The OCSP and CMP signers' and manufacturer CAs' keys are made in
        /// the same token; the data dir records only their URIs.
        #[arg(long, requires = "pin_file")]
        ca_key_uri: Option<String>,
        /// With --root-out: the root's key in a token too (another token,
        /// or another object), instead of ROOT_OUT/root.key.
        #[arg(long, requires = "root_out")]
        root_key_uri: Option<String>,
        /// The token's user PIN (first line of a file only its owner reads).
        #[arg(long, env = "FLEETGATE_PIN_FILE")]
        pin_file: Option<PathBuf>,
        /// The PIN of the root's token, if another.
        #[arg(long)]
        root_pin_file: Option<PathBuf>,
        /// The public base URL of the OCSP/CRL service, written into the
        /// issuing CA (as `serve --public-url`; default the OCSP listener's
        /// default, http://127.0.0.1:8080).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        public_url: String,
        /// Extra names for the server certificate (as `serve --san`).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// The cluster's shared registry, as `serve --store` (the first
        /// operator is registered there): https://host:port,... or etcd://.
        #[arg(long, value_parser = super::serve_args::parse_store)]
        store: Option<super::serve_args::EtcdEndpoints>,
        /// With --store https://: as `serve --store-ca`.
        #[arg(long)]
        store_ca: Option<PathBuf>,
        /// With --store https://: as `serve --store-cert`.
        #[arg(long, requires = "store_key")]
        store_cert: Option<PathBuf>,
        /// With --store https://: as `serve --store-key`.
        #[arg(long, requires = "store_cert")]
        store_key: Option<PathBuf>,
    },
    /// Root ceremony: sign the root's CRL anew from the manufacturer CAs
    /// revoked so far, and install it on the cluster (through the admin
    /// API). Run it after revoking a manufacturer, and within a year.
    Crl {
        /// The root dir made by `ca init --root-out`.
        #[arg(long)]
        root_dir: PathBuf,
        /// The PIN of the root's token, if its key is in one.
        #[arg(long)]
        pin_file: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Root ceremony: a new issuing CA, while the earlier ones keep
    /// validating (CA rollover, no restart). The node makes the key (in
    /// its token, if its keys are in one) and a request; the root in
    /// ROOT_DIR signs it here; the node installs it at once.
    Rollover {
        #[arg(long)]
        root_dir: PathBuf,
        /// The PIN of the root's token, if its key is in one.
        #[arg(long)]
        pin_file: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Root ceremony: certify the data dir's root OCSP responder for
    /// another year (with the key the node holds). Restart the node (or
    /// SIGHUP it) to use it.
    Responder {
        #[arg(long)]
        root_dir: PathBuf,
        #[arg(long)]
        pin_file: Option<PathBuf>,
        /// The PIN of the data dir's token, if its keys are in one.
        #[arg(long)]
        node_pin_file: Option<PathBuf>,
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "fleetgate-data")]
        data_dir: PathBuf,
    },
}

fn read_pin(path: Option<&Path>) -> anyhow::Result<Option<Pin>> {
    path.map(|p| Pin::from_file(p).with_context(|| format!("the PIN file {}", p.display())))
        .transpose()
}

fn custody(uri: Option<&str>, pin: Option<&Pin>) -> anyhow::Result<Custody> {
    Ok(match uri {
        None => Custody::Files,
        Some(u) => Custody::Token {
            base: TokenUri::parse(u)?,
            pin: pin
                .cloned()
                .context("a key in a token needs its PIN: --pin-file")?,
        },
    })
}

pub(super) async fn ca_cmd(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init {
            data_dir,
            root_out,
            ca_key_uri,
            root_key_uri,
            pin_file,
            root_pin_file,
            public_url,
            sans,
            store,
            store_ca,
            store_cert,
            store_key,
        } => {
            let pin = read_pin(pin_file.as_deref())?;
            let root_pin = read_pin(root_pin_file.as_deref())?.or_else(|| pin.clone());
            let opts = InitOptions {
                server_sans: sans,
                status_url: Some(public_url.trim_end_matches('/').to_owned()),
                custody: custody(ca_key_uri.as_deref(), pin.as_ref())?,
                root_custody: custody(root_key_uri.as_deref(), root_pin.as_ref())?,
                pin,
                root_out: root_out.clone(),
                store: None,
                cache_bytes: None,
            };
            let store = match store {
                None => None,
                Some(e) => {
                    let tls = match (e.tls, store_ca) {
                        (false, _) => None,
                        (true, None) => anyhow::bail!("--store https://... needs --store-ca"),
                        (true, Some(ca)) => Some(crate::etcd::EtcdTls {
                            ca,
                            identity: store_cert.zip(store_key),
                        }),
                    };
                    let s = tokio::task::spawn_blocking(move || {
                        crate::etcd::EtcdStore::connect_counted(
                            e.members,
                            "fleetgate/",
                            tls,
                            std::sync::Arc::new(crate::etcd::Unobserved),
                        )
                    })
                    .await?
                    .context("the registry's etcd cluster")?;
                    Some(std::sync::Arc::new(s) as std::sync::Arc<dyn provisioning::store::Store>)
                }
            };
            let opts = InitOptions { store, ..opts };
            if Paths::new(&data_dir).marker().exists() {
                anyhow::bail!(
                    "{} is already a fleetgate data dir: ca init makes a new CA in an empty one",
                    data_dir.display()
                );
            }
            let auth = tokio::task::spawn_blocking({
                let data_dir = data_dir.clone();
                move || Authority::open_or_init(&data_dir, &opts)
            })
            .await??;
            outln!(
                "created a CA in {}: issuing CA key {}",
                data_dir.display(),
                auth.ca.issuing().key().location()
            );
            match &root_out {
                Some(r) => outln!(
                    "the root's key is in {} only: keep it offline; ceremonies take --root-dir {}",
                    r.display(),
                    r.display()
                ),
                None => outln!("the root's key is in the data dir (ca/root.key)"),
            }
            Ok(())
        }
        CaCmd::Crl {
            root_dir,
            pin_file,
            api,
        } => {
            let root = RootDir::new(&root_dir).open(read_pin(pin_file.as_deref())?.as_ref())?;
            let client = api.client()?;
            let all: Vec<provisioning::manufacturer::ManufacturerRecord> =
                client.get("/v1/manufacturers").await?;
            let revoked: Vec<Listed> = all
                .into_iter()
                .filter(|m| m.kind == provisioning::manufacturer::CaKind::Issued)
                .filter_map(|m| {
                    m.revocation.map(|r| Listed {
                        serial: m.serial,
                        at: r.at,
                        reason: Some(r.reason),
                    })
                })
                .collect();
            let (der, number) = ceremony::root_crl(&root, &revoked)?;
            let pem = provisioning::manufacturer::pem_encode("X509 CRL", &der);
            let _: serde_json::Value = client
                .post("/v1/ca/root-crl", &json!({ "crl_pem": pem }))
                .await?;
            outln!(
                "root CRL {number} signed ({} revoked manufacturer CAs, valid a year) and installed",
                revoked.len()
            );
            Ok(())
        }
        CaCmd::Rollover {
            root_dir,
            pin_file,
            api,
        } => {
            let root = RootDir::new(&root_dir).open(read_pin(pin_file.as_deref())?.as_ref())?;
            let client = api.client()?;
            let req: fleetgate_api::types::RolloverRequest =
                client.post("/v1/ca/issuing/request", &json!({})).await?;
            if req.root_pem.trim() != root.pem.trim() {
                anyhow::bail!(
                    "the node's root is not the root in {}: wrong root dir or wrong cluster",
                    root_dir.display()
                );
            }
            let cert = ceremony::sign_issuing_csr(
                &root,
                &req.csr_pem,
                &req.common_name,
                req.status_url.as_deref(),
            )?;
            let done: serde_json::Value = client
                .post("/v1/ca/issuing", &json!({ "cert_pem": cert.chain_pem }))
                .await?;
            outln!(
                "rolled over to {} (generation {}, serial {}): new certificates come from it; \
                 the earlier issuing CAs still validate",
                req.common_name,
                done["generation"],
                cert.serial
            );
            Ok(())
        }
        CaCmd::Responder {
            root_dir,
            pin_file,
            node_pin_file,
            data_dir,
        } => {
            let root = RootDir::new(&root_dir).open(read_pin(pin_file.as_deref())?.as_ref())?;
            let node_pin = read_pin(node_pin_file.as_deref())?;
            let cert = ceremony::renew_responder(&root, &Paths::new(&data_dir), node_pin.as_ref())?;
            outln!(
                "the root's OCSP responder in {} is certified until {}",
                data_dir.display(),
                rfc3339(cert.not_after)
            );
            Ok(())
        }
    }
}
