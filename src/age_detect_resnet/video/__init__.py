"""Videos: frames read at a stride (reader), faces followed and ages steadied per person (tracking, pure
logic: the web page's live camera uses it too), and the whole pipeline over a file (process).

Import the modules themselves (`from age_detect_resnet.video.tracking import FaceTracker`): this package
imports nothing, so that tracking stays usable without the model stack."""
