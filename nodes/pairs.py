"""Preference-pair nodes: build pairs from ranked candidates, real photos (HG-DPO) or an
artist's choice; merge, preview, save and load them."""

from __future__ import annotations

import os

from comfy_api.v0_0_2 import io, ui

from ..comfy_glue.pairs import ImageMaps, PairSide, build_pairs, pairs_folder, saved_pair_files
from ..pure.errors import InputError
from ..pure.files import sanitize_file_stem, unused_stem
from ..pure.images import fit_to_size
from ..pure.pairs import load_pairs, merge_pairs, preview_grid, rank_pairs, save_pairs
from .errors import check_number_inputs, node_errors
from .inputs import image_input_fitted, image_input_to_rgb, optional_mask
from .types import CATEGORY, PatchQuality, PreferencePairsType


def fitted_references(references, title: str, size: tuple[int, int]):
    """The optional ``references`` IMAGE as ``[R, 3, height, width]`` fitted to the pairs' size."""
    return None if references is None else image_input_fitted(references, "references", title, size)


def reference_input():
    return io.Image.Input(
        "references",
        optional=True,
        tooltip="Optional: the subject's reference photos, stored with the pairs. The trainer then trains in "
        "JeDi's joint batch (the images attend to the references) when its MODEL went through Joint "
        "Attention. Center-cropped and resized to the pairs' size.",
    )


class PairsFromRankedCandidates(io.ComfyNode):
    TITLE = "Preference Pairs from Ranked Candidates"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PairsFromRankedCandidates",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Ranks generated candidates of one prompt by mean patch quality and pairs better against "
                "worse. The loser's weight map is 1 - its patch quality, so training concentrates on the "
                "patches that disagree with the subject; the winner's is its quality."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (latents are stored)."),
                io.Conditioning.Input("positive", tooltip="The conditioning the candidates were generated with."),
                io.Image.Input("candidates", tooltip="Generated candidates for one prompt (a batch of 2 or more)."),
                PatchQuality.Input("patch_quality", tooltip="Patch Quality Score of exactly these candidates."),
                io.Combo.Input(
                    "pairing",
                    options=["best_vs_worst", "all_above_margin"],
                    default="best_vs_worst",
                    tooltip="One pair (best vs worst), or every pair whose score gap exceeds the margin.",
                ),
                io.Float.Input(
                    "margin",
                    default=0.02,
                    min=0.0,
                    max=1.0,
                    step=0.005,
                    tooltip="Minimum difference of mean patch quality for a pair.",
                ),
                reference_input(),
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Preference pairs for the trainer.")],
        )

    @classmethod
    def execute(cls, vae, positive, candidates, patch_quality, pairing, margin, references=None) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, locals())
            images = image_input_to_rgb(candidates, "candidates", cls.TITLE)
            quality = patch_quality.quality
            if quality.shape[0] != images.shape[0] or tuple(patch_quality.image_size) != tuple(images.shape[-2:]):
                raise InputError(
                    f"patch_quality scores {quality.shape[0]} images of size "
                    f"{tuple(patch_quality.image_size)} but candidates are {images.shape[0]} of size "
                    f"{tuple(images.shape[-2:])}; score exactly these candidates."
                )
            scores = [float(s) for s in patch_quality.scores]
            chosen = rank_pairs(scores, pairing, margin)
            reference_images = fitted_references(references, cls.TITLE, tuple(images.shape[-2:]))
        maps = patch_quality.upsampled(tuple(images.shape[-2:]))
        w_index = [w for w, _, _ in chosen]
        l_index = [loser for _, loser, _ in chosen]
        metadata = [
            {"source": "ranked", "difficulty": difficulty, "winner_score": scores[w], "loser_score": scores[loser]}
            for w, loser, difficulty in chosen
        ]
        return io.NodeOutput(
            build_pairs(
                vae=vae,
                positive=positive,
                winners=PairSide(images, w_index),
                losers=PairSide(images, l_index),
                maps=ImageMaps(
                    winner_weights=maps[w_index], loser_weights=1.0 - maps[l_index], loser_quality=maps[l_index]
                ),
                metadata=metadata,
                references=reference_images,
            )
        )


class PairsFromRealPhotos(io.ComfyNode):
    TITLE = "Preference Pairs from Real Photos"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PairsFromRealPhotos",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "HG-DPO style: real photos are the winners, generated images the losers (the 'hard' stage "
                "of the hg_dpo curriculum). Photos are center-cropped to the generated images' aspect and "
                "resized to their size; they are cycled if there are fewer photos than generated images."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you will train."),
                io.Conditioning.Input("positive", tooltip="The conditioning the generated images were made with."),
                io.Image.Input("real_photos", tooltip="Real photos of the subject (winners)."),
                io.Image.Input("generated", tooltip="Generated images (losers)."),
                PatchQuality.Input(
                    "patch_quality",
                    optional=True,
                    tooltip="Optional Patch Quality Score of `generated`: their bad patches weigh most.",
                ),
                reference_input(),
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Preference pairs for the trainer.")],
        )

    @classmethod
    def execute(cls, vae, positive, real_photos, generated, patch_quality=None, references=None) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            losers = image_input_to_rgb(generated, "generated", cls.TITLE)
            size = tuple(losers.shape[-2:])
            photos = image_input_fitted(real_photos, "real_photos", cls.TITLE, size)
            count = losers.shape[0]
            loser_quality = None
            if patch_quality is not None:
                if patch_quality.quality.shape[0] != count:
                    raise InputError(
                        f"patch_quality scores {patch_quality.quality.shape[0]} images but {count} are "
                        "generated; score exactly these images."
                    )
                loser_quality = patch_quality.upsampled(size)
            reference_images = fitted_references(references, cls.TITLE, size)
        metadata = [{"source": "real", "difficulty": "hard"} for _ in range(count)]
        photo_index = [i % photos.shape[0] for i in range(count)]  # photos are cycled
        return io.NodeOutput(
            build_pairs(
                vae=vae,
                positive=positive,
                winners=PairSide(photos, photo_index),
                losers=PairSide(losers, list(range(count))),
                maps=ImageMaps(
                    loser_weights=None if loser_quality is None else 1.0 - loser_quality, loser_quality=loser_quality
                ),
                metadata=metadata,
                references=reference_images,
            )
        )


class PairsFromArtistChoice(io.ComfyNode):
    TITLE = "Preference Pairs from Artist Choice"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PairsFromArtistChoice",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "You pick: a winner image and a loser image (or batches, paired in order). Paint masks in "
                "ComfyUI's mask editor to say where: loser_bad_mask marks the regions that are wrong, "
                "winner_good_mask the regions that are right; training then counts those regions most. "
                "A winner of another size is center-cropped and resized to the loser's size."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you will train."),
                io.Conditioning.Input("positive", tooltip="The conditioning both images stand for."),
                io.Image.Input("winner", tooltip="The preferred image(s)."),
                io.Image.Input("loser", tooltip="The rejected image(s)."),
                io.Mask.Input("winner_good_mask", optional=True, tooltip="Optional: where the winner is right."),
                io.Mask.Input("loser_bad_mask", optional=True, tooltip="Optional: where the loser is wrong."),
                reference_input(),
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Preference pairs for the trainer.")],
        )

    @classmethod
    def execute(
        cls, vae, positive, winner, loser, winner_good_mask=None, loser_bad_mask=None, references=None
    ) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            losers = image_input_to_rgb(loser, "loser", cls.TITLE)
            size = tuple(losers.shape[-2:])
            winners = image_input_fitted(winner, "winner", cls.TITLE, size)
            count = max(winners.shape[0], losers.shape[0])
            if winners.shape[0] not in (1, count) or losers.shape[0] not in (1, count):
                raise InputError(
                    f"{winners.shape[0]} winners and {losers.shape[0]} losers cannot be paired; give "
                    "equal counts, or one image on either side."
                )

            def mask_maps(mask, label):
                """Per pair, cropped and resized like the images (so a winner's mask stays on it)."""
                mask = optional_mask(mask, label, cls.TITLE, count, masks_noun=f"{label} masks", count_of="pairs")
                return None if mask is None else fit_to_size(mask.unsqueeze(1), size).squeeze(1).expand(count, -1, -1)

            good, bad = mask_maps(winner_good_mask, "winner_good_mask"), mask_maps(loser_bad_mask, "loser_bad_mask")
            reference_images = fitted_references(references, cls.TITLE, size)
        metadata = [{"source": "artist", "difficulty": "normal"} for _ in range(count)]
        return io.NodeOutput(
            build_pairs(
                vae=vae,
                positive=positive,
                winners=PairSide(winners, [i % winners.shape[0] for i in range(count)]),
                losers=PairSide(losers, [i % losers.shape[0] for i in range(count)]),
                maps=ImageMaps(
                    winner_weights=good, loser_weights=bad, loser_quality=None if bad is None else 1.0 - bad
                ),
                metadata=metadata,
                references=reference_images,
            )
        )


class MergePreferencePairs(io.ComfyNode):
    TITLE = "Merge Preference Pairs"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_MergePreferencePairs",
            display_name=cls.TITLE,
            category=CATEGORY,
            description="Joins two pair sets (e.g. several prompts, or ranked + real-photo pairs) into one.",
            inputs=[
                PreferencePairsType.Input("pairs_a", tooltip="First pair set."),
                PreferencePairsType.Input("pairs_b", tooltip="Second pair set (same image size)."),
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Both sets together.")],
        )

    @classmethod
    def execute(cls, pairs_a, pairs_b) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            return io.NodeOutput(merge_pairs(pairs_a, pairs_b))


class PreviewPreferencePairs(io.ComfyNode):
    TITLE = "Preview Preference Pairs"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PreviewPreferencePairs",
            display_name=cls.TITLE,
            category=CATEGORY,
            description="A labelled grid: winner | loser | winner weights | loser weights (red = counts most).",
            is_output_node=True,
            inputs=[
                PreferencePairsType.Input("pairs", tooltip="The pair set to look at."),
                io.Int.Input("max_pairs", default=8, min=1, max=64, tooltip="How many pairs to show."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The preview grid as an IMAGE.")],
        )

    @classmethod
    def execute(cls, pairs, max_pairs) -> io.NodeOutput:
        grid = preview_grid(pairs, max_pairs)
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))


class SavePreferencePairs(io.ComfyNode):
    TITLE = "Save Preference Pairs"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_SavePreferencePairs",
            display_name=cls.TITLE,
            category=CATEGORY,
            description="Writes the pairs to output/preference_pairs/<name>.safetensors + .json (atomically), "
            "to train many times or share. An existing name gets a numbered suffix.",
            is_output_node=True,
            inputs=[
                PreferencePairsType.Input("pairs", tooltip="The pair set to save."),
                io.String.Input("name", default="my_subject_pairs", tooltip="File name (letters, digits, -, _)."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, pairs, name) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            stem = sanitize_file_stem(name)
            if not stem:
                raise InputError(f"'{name}' has no usable characters; use letters and digits.")
            folder = pairs_folder()
            tensor_path, _ = save_pairs(pairs, os.path.join(folder, unused_stem(folder, stem)))
        return io.NodeOutput(ui=ui.PreviewText(f"saved {len(pairs)} pairs to {tensor_path}"))


class LoadPreferencePairs(io.ComfyNode):
    TITLE = "Load Preference Pairs"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_LoadPreferencePairs",
            display_name=cls.TITLE,
            category=CATEGORY,
            description="Loads a pair set saved by Save Preference Pairs from output/preference_pairs/.",
            inputs=[
                io.Combo.Input(
                    "file",
                    options=saved_pair_files(),
                    tooltip="A .safetensors in output/preference_pairs/ (its .json must be beside it).",
                )
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="The loaded pair set.")],
        )

    @classmethod
    def validate_inputs(cls, file):
        if not os.path.isfile(os.path.join(pairs_folder(), file)):
            return f"{cls.TITLE}: '{file}' is not in {pairs_folder()}; save pairs there first."
        return True

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            return io.NodeOutput(load_pairs(os.path.join(pairs_folder(), file)))
