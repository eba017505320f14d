plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
}

// Execution provider the app asks for: -Psmolvlm.backend=cpu|nnapi|xnnpack (default in gradle.properties).
val backend = providers.gradleProperty("smolvlm.backend").getOrElse("cpu")
require(backend in setOf("cpu", "nnapi", "xnnpack")) {
    "smolvlm.backend must be cpu, nnapi or xnnpack, got '$backend'"
}

android {
    namespace = "org.smolvlmedge.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "org.smolvlmedge.demo"
        minSdk = 24
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
        buildConfigField("String", "BACKEND", "\"$backend\"")
        // 64-bit phones, plus x86_64 for the emulator: a ~170 MB model has no place on 32-bit devices.
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }

    buildFeatures {
        buildConfig = true
        viewBinding = true
    }

    // A model bundled in assets stays uncompressed in the APK, so the one-time copy to filesDir streams it
    // instead of inflating 170 MB (and older AssetManagers refuse large compressed assets).
    androidResources {
        noCompress += "onnx"
        noCompress += "ort"
    }
}

dependencies {
    implementation(libs.androidx.core.ktx)
    implementation(libs.androidx.appcompat)
    implementation(libs.androidx.activity.ktx)
    implementation(libs.androidx.lifecycle.runtime.ktx)
    implementation(libs.androidx.exifinterface)
    implementation(libs.material)
    implementation(libs.kotlinx.coroutines.android)
    implementation(libs.onnxruntime.android)
    implementation(libs.onnxruntime.extensions.android)
}
