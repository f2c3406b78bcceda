//! Target addresses: `file:///dir/standby.img` and
//! `ssh://user@host[:port]/dir/standby.img`.
//!
//! The directory part becomes the agent's root and the last component the
//! image it writes, so an address can never name a file outside the
//! directory it shows. `..` and `.` components are refused outright rather
//! than resolved: what the admin reads is what ferry writes.

use std::{fmt, path::PathBuf, str::FromStr};

use crate::image::Format;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("target {url:?}: expected file:///path/image or ssh://user@host[:port]/path/image")]
    Scheme { url: String },
    #[error("target {url:?}: the path must be absolute and name an image file")]
    Path { url: String },
    #[error("target {url:?}: '.' and '..' are not allowed in the path")]
    DotComponent { url: String },
    #[error("target {url:?}: bad port {port:?}")]
    Port { url: String, port: String },
    #[error("target {url:?}: a user and a host are required (ssh://user@host/path)")]
    Host { url: String },
    #[error("target {url:?}: unknown option {option:?} (known: format=raw|qcow2|vmdk|vhdx)")]
    Option { url: String, option: String },
    #[error("target {url:?}: unknown image format {format:?} (known: raw, qcow2, vmdk, vhdx)")]
    Format { url: String, format: String },
}

/// Where the agent runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// In this process, on this host.
    Local,
    Ssh {
        user: String,
        host: String,
        port: u16,
    },
}

/// A parsed target address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetUrl {
    pub endpoint: Endpoint,
    /// The agent's root: the directory holding the image.
    pub root: PathBuf,
    /// The image file name, relative to `root`.
    pub image: String,
    /// `?format=`; otherwise the image name's extension decides.
    pub format: Option<Format>,
}

impl TargetUrl {
    /// The image's format: as given, or as the extension says.
    pub fn format(&self) -> Format {
        self.format
            .unwrap_or_else(|| Format::from_name(&self.image))
    }
}

impl FromStr for TargetUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let owned = || url.to_owned();
        let (rest, query) = url.split_once('?').unwrap_or((url, ""));
        let mut format = None;
        for option in query.split('&').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("format", f)) => {
                    format = Some(f.parse::<Format>().map_err(|_| UrlError::Format {
                        url: owned(),
                        format: f.to_owned(),
                    })?)
                }
                _ => {
                    return Err(UrlError::Option {
                        url: owned(),
                        option: option.to_owned(),
                    })
                }
            }
        }
        let (endpoint, path) = if let Some(path) = rest.strip_prefix("file://") {
            (Endpoint::Local, path)
        } else if let Some(after) = rest.strip_prefix("ssh://") {
            let (authority, path) = match after.find('/') {
                Some(i) => after.split_at(i),
                None => return Err(UrlError::Path { url: owned() }),
            };
            let (user, hostport) = authority
                .split_once('@')
                .ok_or(UrlError::Host { url: owned() })?;
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse::<u16>()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| UrlError::Port {
                            url: owned(),
                            port: p.to_owned(),
                        })?,
                ),
                None => (hostport, 22),
            };
            if user.is_empty() || host.is_empty() {
                return Err(UrlError::Host { url: owned() });
            }
            (
                Endpoint::Ssh {
                    user: user.to_owned(),
                    host: host.to_owned(),
                    port,
                },
                path,
            )
        } else {
            return Err(UrlError::Scheme { url: owned() });
        };
        if !path.starts_with('/') || path.ends_with('/') {
            return Err(UrlError::Path { url: owned() });
        }
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(UrlError::DotComponent { url: owned() });
        }
        let Some((image, dirs)) = parts.split_last() else {
            return Err(UrlError::Path { url: owned() });
        };
        let root = PathBuf::from("/").join(dirs.join("/"));
        Ok(TargetUrl {
            endpoint,
            root,
            image: (*image).to_owned(),
            format,
        })
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.root.join(&self.image);
        let query = match self.format {
            Some(fmt) => format!("?format={}", fmt.name()),
            None => String::new(),
        };
        match &self.endpoint {
            Endpoint::Local => write!(f, "file://{}{query}", path.display()),
            Endpoint::Ssh { user, host, port } if *port == 22 => {
                write!(f, "ssh://{user}@{host}{}{query}", path.display())
            }
            Endpoint::Ssh { user, host, port } => {
                write!(f, "ssh://{user}@{host}:{port}{}{query}", path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let t: TargetUrl = "file:///var/standby/web.img".parse().unwrap();
        assert_eq!(t.endpoint, Endpoint::Local);
        assert_eq!(t.root, PathBuf::from("/var/standby"));
        assert_eq!(t.image, "web.img");
        assert_eq!(t.to_string(), "file:///var/standby/web.img");

        let t: TargetUrl = "ssh://backup@kvm1:2222/srv/img/db.img".parse().unwrap();
        assert_eq!(
            t.endpoint,
            Endpoint::Ssh {
                user: "backup".into(),
                host: "kvm1".into(),
                port: 2222
            }
        );
        assert_eq!(t.root, PathBuf::from("/srv/img"));
        assert_eq!(t.to_string(), "ssh://backup@kvm1:2222/srv/img/db.img");

        let t: TargetUrl = "file:///v/web.img?format=qcow2".parse().unwrap();
        assert_eq!(t.format(), Format::Qcow2);
        let t: TargetUrl = "file:///v/web.vmdk".parse().unwrap();
        assert_eq!(t.format(), Format::Vmdk);

        let t: TargetUrl = "ssh://root@10.0.0.2/x.img".parse().unwrap();
        assert_eq!(t.root, PathBuf::from("/"));
        assert!(matches!(t.endpoint, Endpoint::Ssh { port: 22, .. }));
    }

    #[test]
    fn refuses_what_it_cannot_mean_exactly() {
        for bad in [
            "/plain/path.img",
            "http://h/x.img",
            "file://relative.img",
            "file:///dir/",
            "file:///",
            "file:///a/../etc/passwd",
            "file:///a/./b.img",
            "ssh://host/x.img",
            "ssh://u@host:0/x.img",
            "ssh://u@host:99999/x.img",
            "ssh://u@/x.img",
            "ssh://u@host",
            "file:///x.img?format=qcow3",
            "file:///x.img?format=",
            "file:///x.img?compress=1",
        ] {
            assert!(bad.parse::<TargetUrl>().is_err(), "{bad} was accepted");
        }
    }
}
