"""The layout of a new nbkit session, shipped as `nbkit.sessions_template`.

`nbkit.session.core.Session.create` copies this folder's sub-folders (without their `.keep` files, which
only exist so git tracks the empty folders) and builds `session.json` from the defaults in
`session.json` here:

    instance_images/   the photos of the subject, as imported (resized, EXIF-rotated)
    captions/          one .txt caption per instance image
    class_images/      generated class images for prior preservation
    checkpoints/       resumable training checkpoints (diffusers folders)
    models/            finished single-file .safetensors models
    outputs/           images generated with the trained model
    logs/              training logs and loss curves
    session.json       the manifest (nbkit.session.manifest.Manifest)
"""
