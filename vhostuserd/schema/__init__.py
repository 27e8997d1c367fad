"""Package data: the JSON Schema of QEMU's vhost-user descriptors and capabilities."""
