"""Studio images built by the project (issue 15): build definitions in the repository's
`images/` directory, built into the host's podman storage by `studio-agent images build`,
incrementally (each image carries the hash of what it was built from as a label).

- `definitions`: loading and checking `images/<name>/image.toml`, build order, content hashes;
- `builder`: running the builds (mmdebstrap + `podman import` for a base, `podman build`
  for images FROM another) and reading what a host has.
- `environment`: a studio's custom environment (a conda environment file with `pip:` and
  our `apt:`), read strictly, hashed by content and turned into a Containerfile (pure);
- `env_builder`: building it into `localhost/studios-env/<tool>:<hash>` FROM the
  template image, asynchronously, cached by content, within a time and a disk limit.

images/README.md describes the definitions and how to add one.
"""
