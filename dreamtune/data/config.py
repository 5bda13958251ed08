"""The `data:` section of a run config: where images and captions come from and how they are shaped."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """Image sources, caption rules and transforms shared by every trainer."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    instance_dir: str | None = Field(
        None, description="Folder of images, searched recursively; a same-name .txt/.caption file is the caption."
    )
    instance_prompt: str | None = Field(
        None, description="Caption for images that have no caption file (e.g. 'a photo of sks dog')."
    )
    caption_extension: str = Field(".txt", description="Sidecar caption extension; '.caption' is also read.")
    dataset: str | None = Field(
        None, description="A hub dataset id, a local dataset folder (save_to_disk or imagefolder) or a data file."
    )
    dataset_config: str | None = Field(None, description="The dataset's configuration name, if it has several.")
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str | None = Field("text", description="Caption column; null uses instance_prompt.")
    resolution: int = Field(512, ge=8, description="Square training size in pixels (a multiple of 8).")
    center_crop: bool = Field(True, description="Center crop after resizing; false crops at random.")
    random_flip: bool = Field(False, description="Flip half of the images horizontally.")
    repeats: int = Field(1, ge=1, description="How many times each image appears per epoch.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.resolution}")
        if self.instance_dir and self.dataset:
            raise ValueError("set only one of data.instance_dir and data.dataset")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ValueError(f"data.caption_extension must start with '.', got {self.caption_extension!r}")
        return self

    def require_source(self) -> None:
        """Fail with the fix when the run has no images to learn from."""
        if not self.instance_dir and not self.dataset:
            raise ValueError(
                "data: no images to train on; set data.instance_dir (a folder of images) "
                "or data.dataset (a hub or local dataset)"
            )
