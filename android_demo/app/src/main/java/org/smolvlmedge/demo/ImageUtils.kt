package org.smolvlmedge.demo

import android.content.ContentResolver
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.graphics.Matrix
import android.net.Uri
import androidx.exifinterface.media.ExifInterface
import kotlin.math.roundToInt

/** An image as the model takes it: [height] rows of [width] pixels, 3 bytes (R, G, B) each, row-major. */
class RgbImage(val bytes: ByteArray, val width: Int, val height: Int)

/** Photos to model input: decode upright, downscale, pack as RGB bytes. */
object ImageUtils {
    /** Longest side handed to the model: the graph resizes to 512 px itself, so more only costs memory and time. */
    const val MAX_SIDE = 1024

    /** Decodes [uri] upright (EXIF orientation), subsampled while decoding and downscaled to [MAX_SIDE]. */
    fun load(resolver: ContentResolver, uri: Uri): Bitmap {
        fun open() = requireNotNull(resolver.openInputStream(uri)) { "cannot open $uri" }

        val bounds = BitmapFactory.Options().apply { inJustDecodeBounds = true }
        open().use { BitmapFactory.decodeStream(it, null, bounds) }
        require(bounds.outWidth > 0 && bounds.outHeight > 0) { "$uri is not an image Android can decode" }
        var sample = 1
        while (maxOf(bounds.outWidth, bounds.outHeight) / (sample * 2) >= MAX_SIDE) sample *= 2
        val options = BitmapFactory.Options().apply { inSampleSize = sample }
        val decoded = open().use { BitmapFactory.decodeStream(it, null, options) }
        val bitmap = requireNotNull(decoded) { "could not decode $uri" }
        val degrees = runCatching { open().use { ExifInterface(it).rotationDegrees } }.getOrDefault(0)
        return downscale(bitmap.rotated(degrees))
    }

    /** [bitmap] scaled so its longest side is at most [maxSide] (the same bitmap when it already fits). */
    fun downscale(bitmap: Bitmap, maxSide: Int = MAX_SIDE): Bitmap {
        val longSide = maxOf(bitmap.width, bitmap.height)
        if (longSide <= maxSide) return bitmap
        val scale = maxSide.toFloat() / longSide
        val width = (bitmap.width * scale).roundToInt().coerceAtLeast(1)
        val height = (bitmap.height * scale).roundToInt().coerceAtLeast(1)
        return Bitmap.createScaledBitmap(bitmap, width, height, true)
    }

    /** Packs [bitmap] as RGB bytes, dropping alpha: the model's `image` input, uint8 [H, W, 3]. */
    fun toRgb(bitmap: Bitmap): RgbImage {
        val argb = if (bitmap.config == Bitmap.Config.ARGB_8888) bitmap else bitmap.copy(Bitmap.Config.ARGB_8888, false)
        val (width, height) = argb.width to argb.height
        val pixels = IntArray(width * height).also { argb.getPixels(it, 0, width, 0, 0, width, height) }
        val rgb = ByteArray(pixels.size * 3)
        pixels.forEachIndexed { i, pixel -> // 0xAARRGGBB
            rgb[3 * i] = (pixel shr 16).toByte()
            rgb[3 * i + 1] = (pixel shr 8).toByte()
            rgb[3 * i + 2] = pixel.toByte()
        }
        return RgbImage(rgb, width, height)
    }

    private fun Bitmap.rotated(degrees: Int): Bitmap =
        if (degrees == 0) this
        else Bitmap.createBitmap(this, 0, 0, width, height, Matrix().apply { postRotate(degrees.toFloat()) }, true)
}
