# Container images are referenced by digest (name@sha256:<64 hex>), so what
# was tested is what runs: a tag can be moved, a digest cannot.
#
# Input: input.images, the images the release deploys (release config
# `image` / `images` and PolicyGate::image).
package cd.images

pinned(image) if regex.match(`@sha256:[a-f0-9]{64}$`, image)

deny contains msg if {
	some image in input.images
	not pinned(image)
	msg := sprintf("image %s is not referenced by digest (use name@sha256:<digest>)", [image])
}
