"""Preference-pair nodes: build pairs from ranked candidates, real photos (HG-DPO) or an
artist's choice; merge, preview, save and load them."""
from __future__ import annotations

import os

import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..personalize.files import sanitize_file_stem, unused_stem
from ..personalize.focus import local_entropy
from ..personalize.heatmap import labelled_strip, overlay_heat
from ..personalize.images import fit_to_size, maps_to_grid
from ..trainers.preference_pairs import PreferencePairs, load_pairs, merge_pairs, rank_pairs, save_pairs
from .inputs import image_input_fitted, image_input_to_rgb, optional_mask
from .types import CATEGORY, PatchQuality, PreferencePairsType

PAIRS_SUBFOLDER = "preference_pairs"
THUMBNAIL_HEIGHT = 128


def pairs_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), PAIRS_SUBFOLDER)


def saved_pair_files() -> list[str]:
    folder = pairs_folder()
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


def encode(vae, images_rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> unscaled latents ``[B, C, h, w]`` (VAE.encode batches by memory)."""
    return vae.encode(images_rgb.movedim(1, -1)).float().cpu()


def thumbnails(images_rgb: torch.Tensor) -> torch.Tensor:
    height, width = images_rgb.shape[-2:]
    size = (THUMBNAIL_HEIGHT, max(1, round(width * THUMBNAIL_HEIGHT / height)))
    return F.interpolate(images_rgb, size=size, mode="area").cpu()


def reference_input():
    return io.Image.Input(
        "references", optional=True,
        tooltip="Optional: the subject's reference photos, stored with the pairs. The trainer then trains in "
                "JeDi's joint batch (the images attend to the references) when its MODEL went through Joint "
                "Attention. Center-cropped and resized to the pairs' size.")


def make_pairs(vae, positive, winner_images, winner_index, loser_images, loser_index, winner_quality, loser_quality,
               winner_weights, loser_weights, metadata, references=None, node_name="Preference Pairs") -> PreferencePairs:
    """Assemble a pair set: pair i is ``winner_images[winner_index[i]]`` against
    ``loser_images[loser_index[i]]`` (``[B, 3, H, W]`` batches of one size). Each image is encoded,
    measured and thumbnailed once however many pairs it is in. Maps are per pair, ``[N, H, W]``
    at image size (or None = 1); ``references`` is the optional IMAGE input of reference photos."""
    size = tuple(loser_images.shape[-2:])
    winners, losers = encode(vae, winner_images), encode(vae, loser_images)
    grid = tuple(winners.shape[-2:])
    count = len(winner_index)
    reference_latents = None
    if references is not None:
        reference_latents = encode(vae, image_input_fitted(references, "references", node_name, size))

    def grid_map(maps):
        return torch.ones(count, *grid) if maps is None else maps_to_grid(maps.cpu(), grid).clamp(0, 1)

    def complexity(images):
        return maps_to_grid(local_entropy(images).cpu(), grid)

    return PreferencePairs(
        winners=winners[winner_index], losers=losers[loser_index], conditionings=[positive],
        condition_index=torch.zeros(count, dtype=torch.long),
        winner_weights=grid_map(winner_weights), loser_weights=grid_map(loser_weights),
        winner_quality=grid_map(winner_quality), loser_quality=grid_map(loser_quality),
        winner_complexity=complexity(winner_images)[winner_index], loser_complexity=complexity(loser_images)[loser_index],
        thumbnails_winner=thumbnails(winner_images)[winner_index], thumbnails_loser=thumbnails(loser_images)[loser_index],
        metadata=metadata, latent_channels=int(winners.shape[1]), references=reference_latents,
    )


class PairsFromRankedCandidates(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PairsFromRankedCandidates",
            display_name="Preference Pairs from Ranked Candidates",
            category=CATEGORY,
            description=(
                "Ranks generated candidates of one prompt by mean patch quality and pairs better against "
                "worse. The loser's weight map is 1 - its patch quality, so training concentrates on the "
                "patches that disagree with the subject; the winner's is its quality."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (latents are stored)."),
                io.Conditioning.Input("positive", tooltip="The conditioning the candidates were generated with."),
                io.Image.Input("candidates", tooltip="Generated candidates for one prompt (a batch of 2 or more)."),
                PatchQuality.Input("patch_quality", tooltip="Patch Quality Score of exactly these candidates."),
                io.Combo.Input("pairing", options=["best_vs_worst", "all_above_margin"], default="best_vs_worst",
                               tooltip="One pair (best vs worst), or every pair whose score gap exceeds the margin."),
                io.Float.Input("margin", default=0.02, min=0.0, max=1.0, step=0.005,
                               tooltip="Minimum difference of mean patch quality for a pair."),
                reference_input(),
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Preference pairs for the trainer.")],
        )

    @classmethod
    def execute(cls, vae, positive, candidates, patch_quality, pairing, margin, references=None) -> io.NodeOutput:
        name = "Preference Pairs from Ranked Candidates"
        images = image_input_to_rgb(candidates, "candidates", name)
        quality = patch_quality.quality
        if quality.shape[0] != images.shape[0] or tuple(patch_quality.image_size) != tuple(images.shape[-2:]):
            raise ValueError(f"{name}: patch_quality scores {quality.shape[0]} images of size "
                             f"{tuple(patch_quality.image_size)} but candidates are {images.shape[0]} of size "
                             f"{tuple(images.shape[-2:])}; score exactly these candidates.")
        scores = [float(s) for s in patch_quality.scores]
        try:
            chosen = rank_pairs(scores, pairing, margin)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        maps = patch_quality.upsampled(tuple(images.shape[-2:]))
        w_index = [w for w, _, _ in chosen]
        l_index = [l for _, l, _ in chosen]
        metadata = [{"source": "ranked", "difficulty": difficulty, "winner_score": scores[w], "loser_score": scores[l]}
                    for w, l, difficulty in chosen]
        pairs = make_pairs(vae, positive, images, w_index, images, l_index, maps[w_index], maps[l_index],
                           maps[w_index], 1.0 - maps[l_index], metadata, references, name)
        return io.NodeOutput(pairs)


class PairsFromRealPhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PairsFromRealPhotos",
            display_name="Preference Pairs from Real Photos",
            category=CATEGORY,
            description=(
                "HG-DPO style: real photos are the winners, generated images the losers (the 'hard' stage "
                "of the hg_dpo curriculum). Photos are center-cropped to the generated images' aspect and "
                "resized to their size; they are cycled if there are fewer photos than generated images."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you will train."),
                io.Conditioning.Input("positive", tooltip="The conditioning the generated images were made with."),
                io.Image.Input("real_photos", tooltip="Real photos of the subject (winners)."),
                io.Image.Input("generated", tooltip="Generated images (losers)."),
                PatchQuality.Input("patch_quality", optional=True,
                                   tooltip="Optional Patch Quality Score of `generated`: their bad patches weigh most."),
                reference_input(),
            ],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Preference pairs for the trainer.")],
        )

    @classmethod
    def execute(cls, vae, positive, real_photos, generated, patch_quality=None, references=None) -> io.NodeOutput:
        name = "Preference Pairs from Real Photos"
        losers = image_input_to_rgb(generated, "generated", name)
        photos = image_input_fitted(real_photos, "real_photos", name, tuple(losers.shape[-2:]))
        count = losers.shape[0]
        loser_quality = None
        if patch_quality is not None:
            if patch_quality.quality.shape[0] != losers.shape[0]:
                raise ValueError(f"{name}: patch_quality scores {patch_quality.quality.shape[0]} images but "
                                 f"{losers.shape[0]} are generated; score exactly these images.")
            loser_quality = patch_quality.upsampled(tuple(losers.shape[-2:]))
        metadata = [{"source": "real", "difficulty": "hard"} for _ in range(count)]
        photo_index = [i % photos.shape[0] for i in range(count)]  # photos are cycled
        pairs = make_pairs(vae, positive, photos, photo_index, losers, list(range(count)), None, loser_quality, None,
                           None if loser_quality is None else 1.0 - loser_quality, metadata, references, name)
        return io.NodeOutput(pairs)


class PairsFromArtistChoice(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PairsFromArtistChoice",
            display_name="Preference Pairs from Artist Choice",
            category=CATEGORY,
            description=(
                "You pick: a winner image and a loser image (or batches, paired in order). Paint masks in "
                "ComfyUI's mask editor to say where: loser_bad_mask marks the regions that are wrong, "
                "winner_good_mask the regions that are right; training then counts those regions most. "
                "A winner of another size is center-cropped and resized to the loser's size."),
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
    def execute(cls, vae, positive, winner, loser, winner_good_mask=None, loser_bad_mask=None,
                references=None) -> io.NodeOutput:
        name = "Preference Pairs from Artist Choice"
        losers = image_input_to_rgb(loser, "loser", name)
        size = tuple(losers.shape[-2:])
        winners = image_input_fitted(winner, "winner", name, size)
        count = max(winners.shape[0], losers.shape[0])
        if winners.shape[0] not in (1, count) or losers.shape[0] not in (1, count):
            raise ValueError(f"{name}: {winners.shape[0]} winners and {losers.shape[0]} losers cannot be paired; "
                             "give equal counts, or one image on either side.")

        def mask_maps(mask, label):
            """Per pair, cropped and resized like the images (so a winner's mask stays on it)."""
            mask = optional_mask(mask, label, name, count, masks_noun=f"{label} masks", count_of="pairs")
            return None if mask is None else fit_to_size(mask.unsqueeze(1), size).squeeze(1).expand(count, -1, -1)

        good, bad = mask_maps(winner_good_mask, "winner_good_mask"), mask_maps(loser_bad_mask, "loser_bad_mask")
        metadata = [{"source": "artist", "difficulty": "normal"} for _ in range(count)]
        pairs = make_pairs(vae, positive, winners, [i % winners.shape[0] for i in range(count)],
                           losers, [i % losers.shape[0] for i in range(count)], None,
                           None if bad is None else 1.0 - bad, good, bad, metadata, references, name)
        return io.NodeOutput(pairs)


class MergePreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_MergePreferencePairs",
            display_name="Merge Preference Pairs",
            category=CATEGORY,
            description="Joins two pair sets (e.g. several prompts, or ranked + real-photo pairs) into one.",
            inputs=[PreferencePairsType.Input("pairs_a", tooltip="First pair set."),
                    PreferencePairsType.Input("pairs_b", tooltip="Second pair set (same image size).")],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="Both sets together.")],
        )

    @classmethod
    def execute(cls, pairs_a, pairs_b) -> io.NodeOutput:
        try:
            return io.NodeOutput(merge_pairs(pairs_a, pairs_b))
        except ValueError as error:
            raise ValueError(f"Merge Preference Pairs: {error}") from error


def preview_grid(pairs: PreferencePairs, max_pairs: int) -> torch.Tensor:
    """Rows of winner | loser | winner weights | loser weights, labelled; ``[1, H, W, 3]``."""
    rows = []
    for index in range(min(max_pairs, len(pairs))):
        winner, loser = pairs.thumbnails_winner[index:index + 1].float(), pairs.thumbnails_loser[index:index + 1].float()
        size = tuple(winner.shape[-2:])

        def heat(weights):
            upsampled = F.interpolate(weights[index:index + 1].unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
            return overlay_heat(loser * 0 + 0.5, upsampled, 0.85)[0]

        meta = pairs.metadata[index]
        score = f" {meta['winner_score']:.2f} vs {meta['loser_score']:.2f}" if "winner_score" in meta else ""
        labels = [f"#{index + 1} winner ({meta.get('source', '?')}){score}", "loser", "winner weights", "loser weights"]
        frames = torch.stack([winner[0], F.interpolate(loser, size=size, mode="area")[0],
                              heat(pairs.winner_weights), heat(pairs.loser_weights)])
        rows.append(labelled_strip(frames, labels))
    width = max(row.shape[-1] for row in rows)
    rows = [F.pad(row, (0, width - row.shape[-1], 0, 4)) for row in rows]
    return torch.cat(rows, dim=1).movedim(0, -1).unsqueeze(0)


class PreviewPreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PreviewPreferencePairs",
            display_name="Preview Preference Pairs",
            category=CATEGORY,
            description="A labelled grid: winner | loser | winner weights | loser weights (red = counts most).",
            is_output_node=True,
            inputs=[PreferencePairsType.Input("pairs", tooltip="The pair set to look at."),
                    io.Int.Input("max_pairs", default=8, min=1, max=64, tooltip="How many pairs to show.")],
            outputs=[io.Image.Output(display_name="grid", tooltip="The preview grid as an IMAGE.")],
        )

    @classmethod
    def execute(cls, pairs, max_pairs) -> io.NodeOutput:
        grid = preview_grid(pairs, max_pairs)
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))


class SavePreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_SavePreferencePairs",
            display_name="Save Preference Pairs",
            category=CATEGORY,
            description="Writes the pairs to output/preference_pairs/<name>.safetensors + .json (atomically), "
                        "to train many times or share. An existing name gets a numbered suffix.",
            is_output_node=True,
            inputs=[PreferencePairsType.Input("pairs", tooltip="The pair set to save."),
                    io.String.Input("name", default="my_subject_pairs", tooltip="File name (letters, digits, -, _).")],
            outputs=[],
        )

    @classmethod
    def execute(cls, pairs, name) -> io.NodeOutput:
        stem = sanitize_file_stem(name)
        if not stem:
            raise ValueError(f"Save Preference Pairs: '{name}' has no usable characters; use letters and digits.")
        folder = pairs_folder()
        try:
            tensor_path, _ = save_pairs(pairs, os.path.join(folder, unused_stem(folder, stem)))
        except ValueError as error:
            raise ValueError(f"Save Preference Pairs: {error}") from error
        return io.NodeOutput(ui=ui.PreviewText(f"saved {len(pairs)} pairs to {tensor_path}"))


class LoadPreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_LoadPreferencePairs",
            display_name="Load Preference Pairs",
            category=CATEGORY,
            description="Loads a pair set saved by Save Preference Pairs from output/preference_pairs/.",
            inputs=[io.Combo.Input("file", options=saved_pair_files(),
                                   tooltip="A .safetensors in output/preference_pairs/ (its .json must be beside it).")],
            outputs=[PreferencePairsType.Output(display_name="pairs", tooltip="The loaded pair set.")],
        )

    @classmethod
    def validate_inputs(cls, file):
        if not os.path.isfile(os.path.join(pairs_folder(), file)):
            return f"Load Preference Pairs: '{file}' is not in {pairs_folder()}; save pairs there first."
        return True

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_pairs(os.path.join(pairs_folder(), file)))
        except Exception as error:  # a corrupt file raises safetensors/json errors
            raise ValueError(f"Load Preference Pairs: cannot read '{file}': {error}") from error
