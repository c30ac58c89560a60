//! The node's local image store. No registry is reachable from the machines this runs on, so
//! images come in as OCI image layouts (a directory, or a tar file of one) through
//! `node-agent image import`; each manifest is unpacked once into a root filesystem (layers in
//! order, whiteouts applied) next to its configuration, and found by the names the layout gives
//! it (`org.opencontainers.image.ref.name`). [`build_layout`] writes such a layout from files
//! of this machine: the harness builds the images of the tests and the demo with it.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use oci_spec::image::{
    Arch, ConfigBuilder, DescriptorBuilder, Digest, ImageConfiguration, ImageConfigurationBuilder,
    ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType, Os,
    RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The annotation an OCI layout names its images with.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image {0:?} is not in this node's image store (import it with `node-agent image import`)"
    )]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a container takes from its image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
}

/// An unpacked image.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest's digest (hex).
    pub id: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

/// `busybox` → `busybox:latest`; `docker.io/library/busybox:1.36` → `busybox:1.36`.
pub fn normalize(reference: &str) -> String {
    let mut name = reference
        .trim_start_matches("docker.io/")
        .trim_start_matches("library/")
        .to_owned();
    let last = name.rsplit('/').next().unwrap_or("");
    if !last.contains(':') && !last.contains('@') {
        name.push_str(":latest");
    }
    name
}

pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// The store under `dir` (created as needed).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn refs_path(&self) -> PathBuf {
        self.dir.join("refs.json")
    }

    fn refs(&self) -> BTreeMap<String, String> {
        fs::read(self.refs_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Every name with its image's id.
    pub fn list(&self) -> BTreeMap<String, String> {
        self.refs()
    }

    /// The image a pod names.
    pub fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        let name = normalize(reference);
        let id = self
            .refs()
            .get(&name)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(reference.to_owned()))?;
        let dir = self.dir.join(&id);
        let config_path = dir.join("config.json");
        let config: ImageConfig =
            serde_json::from_slice(&fs::read(&config_path).map_err(io(&config_path))?)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", config_path.display())))?;
        Ok(Image {
            id,
            rootfs: dir.join("rootfs"),
            config,
        })
    }

    /// Imports an OCI image layout (a directory, or a tar file of one); returns the names it
    /// brought in.
    pub fn import(&self, path: &Path) -> Result<Vec<String>, ImageError> {
        if path.is_dir() {
            return self.import_layout(path);
        }
        let scratch = tempfile::Builder::new()
            .prefix(".import-")
            .tempdir_in(self.ensure_dir()?)
            .map_err(io(&self.dir))?;
        let file = File::open(path).map_err(io(path))?;
        let mut archive = tar::Archive::new(maybe_gzip(file, path)?);
        archive.unpack(scratch.path()).map_err(io(path))?;
        self.import_layout(scratch.path())
    }

    fn ensure_dir(&self) -> Result<&Path, ImageError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        Ok(&self.dir)
    }

    fn import_layout(&self, layout: &Path) -> Result<Vec<String>, ImageError> {
        self.ensure_dir()?;
        let index_path = layout.join("index.json");
        let index = ImageIndex::from_file(&index_path)
            .map_err(|e| ImageError::Invalid(format!("{}: {e}", index_path.display())))?;
        let blob = |digest: &Digest| {
            layout
                .join("blobs")
                .join(digest.algorithm().as_ref())
                .join(digest.digest())
        };
        let mut names = Vec::new();
        let mut refs = self.refs();
        for descriptor in index.manifests() {
            let Some(name) = descriptor
                .annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
            else {
                continue;
            };
            let manifest_path = blob(descriptor.digest());
            let manifest = ImageManifest::from_file(&manifest_path)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", manifest_path.display())))?;
            let config_path = blob(manifest.config().digest());
            let oci_config = ImageConfiguration::from_file(&config_path)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", config_path.display())))?;
            let id = descriptor.digest().digest().to_owned();
            let target = self.dir.join(&id);
            if !target.join("rootfs").is_dir() {
                let staging = self.dir.join(format!(".{id}.unpacking"));
                let _ = fs::remove_dir_all(&staging);
                let rootfs = staging.join("rootfs");
                fs::create_dir_all(&rootfs).map_err(io(&rootfs))?;
                for layer in manifest.layers() {
                    let path = blob(layer.digest());
                    let file = File::open(&path).map_err(io(&path))?;
                    unpack_layer(maybe_gzip(file, &path)?, &rootfs)?;
                }
                let config = oci_config
                    .config()
                    .as_ref()
                    .map(|c| ImageConfig {
                        entrypoint: c.entrypoint().clone().unwrap_or_default(),
                        cmd: c.cmd().clone().unwrap_or_default(),
                        env: c.env().clone().unwrap_or_default(),
                        working_dir: c.working_dir().clone().unwrap_or_default(),
                    })
                    .unwrap_or_default();
                let config_out = staging.join("config.json");
                fs::write(
                    &config_out,
                    serde_json::to_vec_pretty(&config).expect("serializes"),
                )
                .map_err(io(&config_out))?;
                let _ = fs::remove_dir_all(&target);
                fs::rename(&staging, &target).map_err(io(&target))?;
            }
            let name = normalize(name);
            refs.insert(name.clone(), id);
            names.push(name);
        }
        if names.is_empty() {
            return Err(ImageError::Invalid(format!(
                "{} names no image ({REF_NAME} annotations)",
                index_path.display()
            )));
        }
        let refs_path = self.refs_path();
        let tmp = refs_path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&refs).expect("serializes")).map_err(io(&tmp))?;
        fs::rename(&tmp, &refs_path).map_err(io(&refs_path))?;
        Ok(names)
    }
}

/// A reader that ungzips when the file starts with the gzip magic.
fn maybe_gzip(mut file: File, path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io(path))?;
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let chained = head.chain(file);
    Ok(if magic == [0x1f, 0x8b] {
        Box::new(GzDecoder::new(chained))
    } else {
        Box::new(chained)
    })
}

/// Applies one layer onto `rootfs`: entries are written in order; `.wh.<name>` removes
/// `<name>`, `.wh..wh..opq` empties its directory (the OCI whiteout rules).
fn unpack_layer(reader: impl Read, rootfs: &Path) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(io(rootfs))? {
        let mut entry = entry.map_err(io(rootfs))?;
        let path = entry.path().map_err(io(rootfs))?.into_owned();
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(ImageError::Invalid(format!(
                "layer entry {} leaves the root filesystem",
                path.display()
            )));
        }
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = rootfs.join(path.parent().unwrap_or(Path::new("")));
        match file_name.as_deref() {
            Some(".wh..wh..opq") => {
                if let Ok(entries) = fs::read_dir(&parent) {
                    for e in entries.flatten() {
                        let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
                    }
                }
            }
            Some(name) if name.starts_with(".wh.") => {
                let target = parent.join(&name[4..]);
                let _ = fs::remove_dir_all(&target).or_else(|_| fs::remove_file(&target));
            }
            _ => {
                entry.unpack_in(rootfs).map_err(io(rootfs))?;
            }
        }
    }
    Ok(())
}

/// What goes into an image [`build_layout`] writes.
pub struct ImageSpec<'a> {
    /// The image's name (`keel/echo:latest`).
    pub name: &'a str,
    /// Files of this machine and where they go in the image (absolute paths).
    pub files: Vec<(PathBuf, String)>,
    /// Symbolic links: (path in the image, target).
    pub symlinks: Vec<(String, String)>,
    /// Directories to create (empty).
    pub dirs: Vec<String>,
    pub config: ImageConfig,
}

fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(bytes))
}

/// Writes an OCI image layout with one gzipped layer to `out` (a directory).
pub fn build_layout(out: &Path, spec: &ImageSpec) -> Result<(), ImageError> {
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let write_blob = |bytes: &[u8]| -> Result<(String, u64), ImageError> {
        let hex = sha256_hex(bytes);
        let path = blobs.join(&hex);
        fs::write(&path, bytes).map_err(io(&path))?;
        Ok((hex, bytes.len() as u64))
    };
    // The layer: a tar of the files, then gzipped (the diff ID is the tar's digest).
    let mut tar_bytes = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut tar_bytes);
        builder.mode(tar::HeaderMode::Deterministic);
        let mut dirs: Vec<String> = spec.dirs.clone();
        for (_, to) in &spec.files {
            let mut p = Path::new(to.trim_start_matches('/'));
            while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
                dirs.push(parent.display().to_string());
                p = parent;
            }
        }
        for (link, _) in &spec.symlinks {
            if let Some(parent) = Path::new(link.trim_start_matches('/')).parent()
                && !parent.as_os_str().is_empty()
            {
                dirs.push(parent.display().to_string());
            }
        }
        dirs.iter_mut()
            .for_each(|d| *d = d.trim_matches('/').to_owned());
        dirs.sort();
        dirs.dedup();
        for dir in dirs.iter().filter(|d| !d.is_empty()) {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, format!("{dir}/"), std::io::empty())
                .map_err(io(out))?;
        }
        for (from, to) in &spec.files {
            let data = fs::read(from).map_err(io(from))?;
            let mode = fs::metadata(from).map_err(io(from))?.permissions().mode();
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(mode & 0o7777);
            builder
                .append_data(&mut header, to.trim_start_matches('/'), data.as_slice())
                .map_err(io(from))?;
        }
        for (link, target) in &spec.symlinks {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder
                .append_link(&mut header, link.trim_start_matches('/'), target)
                .map_err(io(out))?;
        }
        builder.finish().map_err(io(out))?;
    }
    let diff_id = sha256_hex(&tar_bytes);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&tar_bytes).map_err(io(out))?;
    let layer = gz.finish().map_err(io(out))?;
    let (layer_hex, layer_size) = write_blob(&layer)?;

    let invalid = |e: oci_spec::OciSpecError| ImageError::Invalid(e.to_string());
    let digest = |hex: &str| -> Result<Digest, ImageError> {
        format!("sha256:{hex}")
            .parse()
            .map_err(|e: oci_spec::OciSpecError| ImageError::Invalid(e.to_string()))
    };
    let mut config = ConfigBuilder::default();
    if !spec.config.entrypoint.is_empty() {
        config = config.entrypoint(spec.config.entrypoint.clone());
    }
    if !spec.config.cmd.is_empty() {
        config = config.cmd(spec.config.cmd.clone());
    }
    if !spec.config.env.is_empty() {
        config = config.env(spec.config.env.clone());
    }
    if !spec.config.working_dir.is_empty() {
        config = config.working_dir(spec.config.working_dir.clone());
    }
    let image_config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config.build().map_err(invalid)?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()
                .map_err(invalid)?,
        )
        .build()
        .map_err(invalid)?;
    let config_bytes = serde_json::to_vec(&image_config).expect("serializes");
    let (config_hex, config_size) = write_blob(&config_bytes)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(digest(&config_hex)?)
                .size(config_size)
                .build()
                .map_err(invalid)?,
        )
        .layers(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageLayerGzip)
                .digest(digest(&layer_hex)?)
                .size(layer_size)
                .build()
                .map_err(invalid)?,
        ])
        .build()
        .map_err(invalid)?;
    let manifest_bytes = serde_json::to_vec(&manifest).expect("serializes");
    let (manifest_hex, manifest_size) = write_blob(&manifest_bytes)?;
    let index: ImageIndex = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(digest(&manifest_hex)?)
                .size(manifest_size)
                .annotations(
                    [(REF_NAME.to_owned(), normalize(spec.name))]
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .build()
                .map_err(invalid)?,
        ])
        .build()
        .map_err(invalid)?;
    let index_path = out.join("index.json");
    fs::write(&index_path, serde_json::to_vec(&index).expect("serializes"))
        .map_err(io(&index_path))?;
    let layout_path = out.join("oci-layout");
    fs::write(&layout_path, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&layout_path))?;
    Ok(())
}

/// The shared libraries a dynamically linked program loads, as `ldd` lists them (host paths),
/// so an image can carry them beside it.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(io(program))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_as_docker_names_them() {
        assert_eq!(normalize("busybox"), "busybox:latest");
        assert_eq!(normalize("docker.io/library/busybox:1.36"), "busybox:1.36");
        assert_eq!(normalize("keel/echo"), "keel/echo:latest");
        assert_eq!(normalize("localhost:5000/x"), "localhost:5000/x:latest");
    }

    #[test]
    fn a_built_layout_imports_with_its_files_links_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let payload = dir.path().join("payload");
        fs::write(&payload, "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(&payload, fs::Permissions::from_mode(0o755)).unwrap();
        let layout = dir.path().join("layout");
        build_layout(
            &layout,
            &ImageSpec {
                name: "test/image:v1",
                files: vec![(payload.clone(), "/bin/hello".into())],
                symlinks: vec![("/bin/hi".into(), "hello".into())],
                dirs: vec!["/tmp".into()],
                config: ImageConfig {
                    entrypoint: vec!["/bin/hello".into()],
                    env: vec!["A=1".into()],
                    ..Default::default()
                },
            },
        )
        .unwrap();
        // As a tar file, as `node-agent image import` takes it.
        let tarball = dir.path().join("image.tar");
        let mut builder = tar::Builder::new(File::create(&tarball).unwrap());
        builder.append_dir_all(".", &layout).unwrap();
        builder.finish().unwrap();
        drop(builder);

        let store = ImageStore::new(dir.path().join("store"));
        assert_eq!(store.import(&tarball).unwrap(), ["test/image:v1"]);
        let image = store.resolve("test/image:v1").unwrap();
        let hello = image.rootfs.join("bin/hello");
        assert_eq!(fs::read_to_string(&hello).unwrap(), "#!/bin/sh\necho hi\n");
        assert_eq!(
            fs::metadata(&hello).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(image.rootfs.join("bin/hi")).unwrap(),
            Path::new("hello")
        );
        assert!(image.rootfs.join("tmp").is_dir());
        assert_eq!(image.config.entrypoint, ["/bin/hello"]);
        assert_eq!(image.config.env, ["A=1"]);
        assert!(matches!(
            store.resolve("missing:latest"),
            Err(ImageError::NotFound(_))
        ));
    }
}
